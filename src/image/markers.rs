//! Step 3c of the request flow, before any pixel: a walk over a JPEG original's markers.
//!
//! It reads the frame header (size, components and their sampling, baseline or progressive) and counts
//! the scans, stopping as soon as there are more than `max_jpeg_scans`. A progressive JPEG may carry
//! any number of scans, and libjpeg decodes each one over the whole coefficient image: a 1.3 MB file
//! whose one AC scan is repeated 20,000 times is valid, raises no warning, and costs about a minute of
//! CPU at any shrink. Real encoders write 1 (baseline) to about 10 scans (libjpeg's default
//! progression has 10), and TurboJPEG and `djpeg -maxscans` refuse such files the same way.
//!
//! The walk only looks at marker bytes: segment lengths are followed, and entropy-coded data is
//! skipped by searching for the next `0xFF` that starts a marker (`memchr`), so it costs about a
//! memory scan of the file, not a decode. It never fails on damaged data: what it cannot read is left
//! for the decoder to refuse.

/// One colour component of the frame: its sampling factors.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Component {
    /// Horizontal sampling factor (1..=4).
    pub h: u8,
    /// Vertical sampling factor (1..=4).
    pub v: u8,
}

/// What the markers say about a JPEG.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Layout {
    /// Width from the frame header (0 when there is none).
    pub width: u32,
    /// Height from the frame header (0 when there is none, or when it is defined by a DNL marker).
    pub height: u32,
    /// The frame's components (empty when there is no frame header).
    pub components: Vec<Component>,
    /// A progressive frame (SOF2, SOF6, SOF10, SOF14): libjpeg holds every coefficient at once.
    pub progressive: bool,
    /// Scans (SOS markers) seen.
    pub scans: u32,
}

impl Layout {
    /// Bytes libjpeg's coefficient buffer takes for a progressive frame: every 8×8 block of every
    /// component, 64 coefficients of 2 bytes each, whatever the output scale. 0 for a baseline frame,
    /// which decodes one block row at a time.
    pub fn coefficient_bytes(&self) -> u64 {
        if !self.progressive {
            return 0;
        }
        let hmax = self
            .components
            .iter()
            .map(|c| c.h)
            .max()
            .unwrap_or(1)
            .max(1);
        let vmax = self
            .components
            .iter()
            .map(|c| c.v)
            .max()
            .unwrap_or(1)
            .max(1);
        // Blocks of an MCU-aligned component plane, as libjpeg allocates them (jdcoefct.c rounds the
        // plane up to whole MCUs of the component).
        let mcu_cols = u64::from(self.width).div_ceil(8 * u64::from(hmax));
        let mcu_rows = u64::from(self.height).div_ceil(8 * u64::from(vmax));
        self.components
            .iter()
            .map(|c| mcu_cols * u64::from(c.h) * mcu_rows * u64::from(c.v) * 128)
            .sum()
    }
}

/// The walk stopped because the file has more than the allowed scans.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("more than {0} scans")]
pub struct TooManyScans(pub u32);

/// Walks `data`'s markers from SOI to EOI (or to where it can read no further), counting scans and
/// stopping with [`TooManyScans`] at the first scan beyond `max_scans`.
pub fn walk(data: &[u8], max_scans: u32) -> Result<Layout, TooManyScans> {
    let mut layout = Layout::default();
    if !data.starts_with(&[0xFF, 0xD8]) {
        return Ok(layout);
    }
    let mut at = 2;
    loop {
        // A marker is 0xFF (any number of fill 0xFF bytes) and a code byte.
        let Some(&first) = data.get(at) else {
            return Ok(layout);
        };
        if first != 0xFF {
            // Garbage between segments: libjpeg skips to the next marker (with a warning, which the
            // decoders then treat as an error). Do the same, so nothing hides scans from the count.
            match memchr::memchr(0xFF, &data[at..]) {
                Some(skip) => at += skip,
                None => return Ok(layout),
            }
            continue;
        }
        while data.get(at) == Some(&0xFF) {
            at += 1;
        }
        let Some(&code) = data.get(at) else {
            return Ok(layout);
        };
        at += 1;
        match code {
            0xD9 => return Ok(layout),             // EOI
            0x01 | 0xD0..=0xD8 | 0x00 => continue, // TEM, RSTn, a stray SOI, a stuffed zero
            _ => {}
        }
        let Some(len) = data
            .get(at..at + 2)
            .map(|b| usize::from(u16::from_be_bytes([b[0], b[1]])))
        else {
            return Ok(layout);
        };
        if len < 2 {
            return Ok(layout);
        }
        let segment = data.get(at + 2..(at + len).min(data.len())).unwrap_or(&[]);
        at += len;
        match code {
            // SOF0..SOF15 except DHT (C4), JPG (C8) and DAC (CC).
            0xC0..=0xCF if !matches!(code, 0xC4 | 0xC8 | 0xCC) => {
                read_frame(segment, code, &mut layout);
            }
            0xDA => {
                layout.scans += 1;
                if layout.scans > max_scans {
                    return Err(TooManyScans(max_scans));
                }
                at = entropy_end(data, at);
            }
            _ => {}
        }
    }
}

/// The frame header: precision, height, width, then (id, sampling, table) per component.
fn read_frame(segment: &[u8], code: u8, layout: &mut Layout) {
    if segment.len() < 6 {
        return;
    }
    layout.height = u32::from(u16::from_be_bytes([segment[1], segment[2]]));
    layout.width = u32::from(u16::from_be_bytes([segment[3], segment[4]]));
    layout.progressive = matches!(code, 0xC2 | 0xC6 | 0xCA | 0xCE);
    let count = usize::from(segment[5]);
    layout.components = segment[6..]
        .chunks_exact(3)
        .take(count)
        .map(|c| Component {
            h: (c[1] >> 4).clamp(1, 4),
            v: (c[1] & 0x0F).clamp(1, 4),
        })
        .collect();
}

/// Where the entropy-coded data that starts at `from` ends: the first 0xFF followed by a byte that
/// is neither a stuffed zero nor a restart marker (those belong to the data), or the end of `data`.
fn entropy_end(data: &[u8], mut from: usize) -> usize {
    while let Some(i) = data.get(from..).and_then(|rest| memchr::memchr(0xFF, rest)) {
        let ff = from + i;
        match data.get(ff + 1) {
            None => return data.len(),
            Some(0x00 | 0xD0..=0xD7 | 0xFF) => from = ff + 1,
            Some(_) => return ff,
        }
    }
    data.len()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A minimal JPEG-shaped byte string: SOI, a SOFn, `scans` × (SOS + entropy bytes), EOI.
    fn shaped(sof: u8, scans: usize, entropy: &[u8]) -> Vec<u8> {
        let mut b = vec![0xFF, 0xD8];
        // APP0 with a length, to be skipped.
        b.extend_from_slice(&[0xFF, 0xE0, 0x00, 0x04, 0xAA, 0xBB]);
        // SOF: precision 8, 600 high, 800 wide, 3 components (Y 2x2, Cb 1x1, Cr 1x1).
        b.extend_from_slice(&[0xFF, sof, 0x00, 17, 8, 0x02, 0x58, 0x03, 0x20, 3]);
        b.extend_from_slice(&[1, 0x22, 0, 2, 0x11, 1, 3, 0x11, 1]);
        for _ in 0..scans {
            b.extend_from_slice(&[0xFF, 0xDA, 0x00, 0x08, 1, 1, 0x00, 0, 63, 0]);
            b.extend_from_slice(entropy);
        }
        b.extend_from_slice(&[0xFF, 0xD9]);
        b
    }

    #[test]
    fn reads_the_frame_and_counts_scans() {
        let l = walk(&shaped(0xC2, 7, &[1, 2, 3]), 100).expect("under the limit");
        assert_eq!(
            (l.width, l.height, l.scans, l.progressive),
            (800, 600, 7, true)
        );
        assert_eq!(
            l.components,
            vec![
                Component { h: 2, v: 2 },
                Component { h: 1, v: 1 },
                Component { h: 1, v: 1 }
            ]
        );
        let baseline = walk(&shaped(0xC0, 1, &[9]), 100).expect("baseline");
        assert!(!baseline.progressive);
        assert_eq!(baseline.coefficient_bytes(), 0);
    }

    #[test]
    fn stops_at_the_first_scan_over_the_limit() {
        assert_eq!(
            walk(&shaped(0xC2, 100, &[5]), 100).map(|l| l.scans),
            Ok(100)
        );
        assert_eq!(walk(&shaped(0xC2, 101, &[5]), 100), Err(TooManyScans(100)));
        assert_eq!(
            walk(&shaped(0xC2, 20_000, &[5]), 100),
            Err(TooManyScans(100))
        );
    }

    /// Stuffed zeros, restart markers and fill bytes inside entropy-coded data are data, not markers;
    /// an SOS-looking pair hidden behind a stuffed zero is not a scan.
    #[test]
    fn entropy_data_is_skipped_exactly() {
        let entropy = [
            0x12, 0xFF, 0x00, 0xDA, 0xFF, 0xD3, 0x44, 0xFF, 0xFF, 0xD5, 0x01,
        ];
        let l = walk(&shaped(0xC2, 3, &entropy), 100).expect("walks");
        assert_eq!(l.scans, 3);
    }

    #[test]
    fn garbage_between_segments_does_not_hide_scans() {
        let mut b = shaped(0xC2, 2, &[1]);
        let eoi = b.len() - 2;
        let mut tail = vec![0x00, 0x11, 0x22];
        for _ in 0..5 {
            tail.extend_from_slice(&[0xFF, 0xDA, 0x00, 0x08, 1, 1, 0x00, 0, 63, 0, 7]);
        }
        b.splice(eoi..eoi, tail);
        assert_eq!(walk(&b, 100).map(|l| l.scans), Ok(7));
        assert_eq!(walk(&b, 6), Err(TooManyScans(6)));
    }

    #[test]
    fn never_fails_on_damaged_or_foreign_data() {
        for bad in [
            &b""[..],
            b"\xFF",
            b"\xFF\xD8",
            b"\xFF\xD8\xFF",
            b"\xFF\xD8\xFF\xC0",
            b"\xFF\xD8\xFF\xC0\x00",
            b"\xFF\xD8\xFF\xC0\x00\x01",
            b"\xFF\xD8\xFF\xDA\x00\x02",
            b"\x89PNG\r\n\x1a\n",
        ] {
            let l = walk(bad, 100).expect("no error on damaged data");
            assert!(l.scans <= 1);
        }
        let cut = shaped(0xC2, 5, &[1, 2, 3]);
        for n in 0..cut.len() {
            assert!(walk(&cut[..n], 100).is_ok());
        }
    }

    /// Coefficient buffer of a progressive 4:2:0 frame: 1.5 coefficients of 2 bytes per pixel, with
    /// each plane rounded up to whole MCUs.
    #[test]
    fn coefficient_bytes_of_a_progressive_frame() {
        let l = walk(&shaped(0xC2, 1, &[0]), 100).expect("walks");
        // 800x600 in 16x16 MCUs: 50 x 38 MCUs; Y 100x76 blocks, Cb and Cr 50x38 each.
        assert_eq!(l.coefficient_bytes(), (100 * 76 + 2 * 50 * 38) * 128);
    }

    proptest::proptest! {
        /// Whatever the bytes, the walk ends without panicking, and never counts past the limit.
        #[test]
        fn any_bytes_are_walked_safely(tail in proptest::collection::vec(proptest::num::u8::ANY, 0..4096), max in 1u32..50) {
            let mut data = vec![0xFF, 0xD8];
            data.extend_from_slice(&tail);
            if let Ok(layout) = walk(&data, max) {
                proptest::prop_assert!(layout.scans <= max);
            }
        }

        /// Scans separated by arbitrary entropy-coded data (0xFF always stuffed or a restart
        /// marker, as an encoder writes it) are counted exactly.
        #[test]
        fn scans_are_counted_exactly(
            scans in 1usize..40,
            entropy in proptest::collection::vec(proptest::num::u8::ANY, 0..256),
        ) {
            let mut coded = Vec::new();
            for (i, b) in entropy.iter().enumerate() {
                coded.push(*b);
                if *b == 0xFF {
                    coded.push(if i % 2 == 0 { 0x00 } else { 0xD0 + (i % 8) as u8 });
                }
            }
            let data = shaped(0xC2, scans, &coded);
            proptest::prop_assert_eq!(walk(&data, 1000).map(|l| l.scans), Ok(scans as u32));
        }
    }
}
