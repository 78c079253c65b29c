//! Step 3c of the request flow, after the WebP encoder: removing the metadata chunks libvips 8.14.1
//! writes although it was asked not to.
//!
//! `webpsave` in libvips 8.14.1 ignores `strip`: even with every metadata field removed from the image
//! it writes a freshly made EXIF chunk (orientation, resolution, EXIF version), and it would copy camera
//! EXIF and GPS through. So every WebP output is cleaned at the RIFF level here, a pure function of the
//! encoded bytes.

/// RIFF chunks that carry metadata in a WebP file, and their VP8X flag bits.
const WEBP_METADATA_CHUNKS: [(&[u8; 4], u8); 3] =
    [(b"ICCP", 0x20), (b"EXIF", 0x08), (b"XMP ", 0x04)];

/// Removes the ICC, EXIF and XMP chunks from a WebP file and clears their VP8X flags. Input that does not parse as RIFF/WebP (it always does: we just encoded it)
/// is returned unchanged rather than risk damaging it.
pub fn without_metadata(webp: Vec<u8>) -> Vec<u8> {
    if webp.len() < 12 || &webp[..4] != b"RIFF" || &webp[8..12] != b"WEBP" {
        return webp;
    }
    let mut out = Vec::with_capacity(webp.len());
    out.extend_from_slice(&webp[..12]);
    let mut dropped = 0u8;
    let mut vp8x_at = None;
    let mut at = 12;
    while at < webp.len() {
        let Some(head) = webp.get(at..at + 8) else {
            return webp;
        };
        let size = u32::from_le_bytes([head[4], head[5], head[6], head[7]]) as usize;
        let end = at + 8 + size + (size & 1);
        if end > webp.len() && at + 8 + size != webp.len() {
            return webp;
        }
        let end = end.min(webp.len());
        let fourcc = &head[..4];
        if let Some((_, bit)) = WEBP_METADATA_CHUNKS
            .iter()
            .find(|(c, _)| c.as_slice() == fourcc)
        {
            dropped |= bit;
        } else {
            if fourcc == b"VP8X" {
                vp8x_at = Some(out.len());
            }
            out.extend_from_slice(&webp[at..end]);
        }
        at = end;
    }
    if let Some(v) = vp8x_at {
        if let Some(flags) = out.get_mut(v + 8) {
            *flags &= !dropped;
        }
    }
    let Ok(riff_size) = u32::try_from(out.len() - 8) else {
        return webp;
    };
    out[4..8].copy_from_slice(&riff_size.to_le_bytes());
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn webp_container_cleaner_drops_metadata_chunks_only() {
        let chunk = |fourcc: &[u8; 4], payload: &[u8]| {
            let mut c = fourcc.to_vec();
            c.extend_from_slice(&(payload.len() as u32).to_le_bytes());
            c.extend_from_slice(payload);
            if payload.len() % 2 == 1 {
                c.push(0);
            }
            c
        };
        let body = [
            chunk(b"VP8X", &[0x2C, 0, 0, 0, 9, 0, 0, 9, 0, 0]),
            chunk(b"ICCP", b"icc"),
            chunk(b"VP8 ", b"pixels"),
            chunk(b"EXIF", b"Exif\0\0MM"),
            chunk(b"XMP ", b"<x/>"),
        ]
        .concat();
        let mut webp = b"RIFF".to_vec();
        webp.extend_from_slice(&((body.len() + 4) as u32).to_le_bytes());
        webp.extend_from_slice(b"WEBP");
        webp.extend_from_slice(&body);
        let clean = without_metadata(webp);
        let want = [
            chunk(b"VP8X", &[0x00, 0, 0, 0, 9, 0, 0, 9, 0, 0]),
            chunk(b"VP8 ", b"pixels"),
        ]
        .concat();
        assert_eq!(&clean[12..], want.as_slice());
        assert_eq!(
            u32::from_le_bytes(clean[4..8].try_into().expect("4")) as usize,
            clean.len() - 8
        );
        // Not RIFF: untouched.
        assert_eq!(without_metadata(b"nope".to_vec()), b"nope");
    }
}
