//! Step 2 of the request flow: the pure URL parser.
//!
//! Owns the grammar `/{model}/{type}/{id}/{version}[-q{Q}].{ext}` (docs/urls.md), the rules that refuse a
//! name before any I/O (404 / 400 / 406), and the canonical name that equivalent URLs share
//! (`x300` ≡ `300x300`, `jpeg` ≡ `jpg`, `-q{default}` ≡ no `-q`). No I/O, no allocation beyond the
//! parsed parts; property-tested below.

use std::fmt;

/// Largest number accepted in a version or quality (five digits).
pub const MAX_NUMBER: u32 = 99_999;

/// An output format, picked by the URL's extension.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Format {
    /// `jpg` / `jpeg`.
    Jpeg,
    /// `png`.
    Png,
    /// `webp`.
    Webp,
    /// `avif`.
    Avif,
    /// `gif`.
    Gif,
}

impl Format {
    /// Every format, in a fixed order.
    pub const ALL: [Format; 5] = [
        Format::Jpeg,
        Format::Png,
        Format::Webp,
        Format::Avif,
        Format::Gif,
    ];

    /// The format named by a URL extension (`jpeg` is `jpg`), in any case (`JPG`, `Png`): cameras
    /// and old upload forms name files in capitals, and the seed's URLs carried them through.
    pub fn from_ext(ext: &str) -> Option<Format> {
        const NAMES: [(&str, Format); 6] = [
            ("jpg", Format::Jpeg),
            ("jpeg", Format::Jpeg),
            ("png", Format::Png),
            ("webp", Format::Webp),
            ("avif", Format::Avif),
            ("gif", Format::Gif),
        ];
        NAMES
            .iter()
            .find(|(name, _)| name.eq_ignore_ascii_case(ext))
            .map(|(_, format)| *format)
    }

    /// The canonical extension.
    pub fn ext(self) -> &'static str {
        match self {
            Format::Jpeg => "jpg",
            Format::Png => "png",
            Format::Webp => "webp",
            Format::Avif => "avif",
            Format::Gif => "gif",
        }
    }

    /// The `Content-Type` of this format.
    pub fn mime(self) -> &'static str {
        match self {
            Format::Jpeg => "image/jpeg",
            Format::Png => "image/png",
            Format::Webp => "image/webp",
            Format::Avif => "image/avif",
            Format::Gif => "image/gif",
        }
    }

    /// Whether the format's encoder uses a quality setting (PNG and GIF do not).
    pub fn uses_quality(self) -> bool {
        matches!(self, Format::Jpeg | Format::Webp | Format::Avif)
    }
}

impl fmt::Display for Format {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.ext())
    }
}

/// The requested geometry.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Version {
    /// `{W}x{H}` or `x{N}`: exactly W×H, scaled to cover then cropped.
    Cover {
        /// Output width.
        width: u32,
        /// Output height.
        height: u32,
    },
    /// `w{N}`: width N, height from the aspect ratio.
    Width(u32),
    /// `h{N}`: height N, width from the aspect ratio.
    Height(u32),
    /// `full_size`: original dimensions, re-encoded.
    FullSize,
}

impl Version {
    /// The width this version asks for, if it names one.
    pub fn width(&self) -> Option<u32> {
        match *self {
            Version::Cover { width, .. } | Version::Width(width) => Some(width),
            _ => None,
        }
    }

    /// The height this version asks for, if it names one.
    pub fn height(&self) -> Option<u32> {
        match *self {
            Version::Cover { height, .. } | Version::Height(height) => Some(height),
            _ => None,
        }
    }
}

impl fmt::Display for Version {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Version::Cover { width, height } => write!(f, "{width}x{height}"),
            Version::Width(w) => write!(f, "w{w}"),
            Version::Height(h) => write!(f, "h{h}"),
            Version::FullSize => f.write_str("full_size"),
        }
    }
}

/// Why a URL was refused. Each maps to one status in [`crate::error::Error::status`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RequestError {
    /// The path matches no route (wrong shape, forbidden characters): 404.
    #[error("no route")]
    NoRoute,
    /// The version name does not parse (`random.jpg`): 404, seed parity.
    #[error("unknown version")]
    UnknownVersion,
    /// A number parses as digits but is out of range (0, leading zero, > 99999, `-q0`, `-q101`): 400.
    #[error("number out of range")]
    OutOfRange,
    /// Width or height over `maximum_width` / `maximum_height`: 406, seed parity.
    #[error("size over the configured maximum")]
    TooLarge,
    /// The extension is not in `whitelisted_extensions`: 406, seed parity.
    #[error("extension not allowed")]
    ExtensionNotAllowed,
    /// The version is not in `allowed_sizes`: 406.
    #[error("size not allowed")]
    SizeNotAllowed,
}

/// The rules a parsed name is checked against (from [`crate::config::Config`]).
#[derive(Clone, Debug)]
pub struct Rules {
    /// `maximum_width`.
    pub maximum_width: u32,
    /// `maximum_height`.
    pub maximum_height: u32,
    /// `whitelisted_extensions`, as formats.
    pub whitelist: Vec<Format>,
    /// Default quality per format (JPEG, WebP, AVIF; PNG/GIF ignore it).
    pub default_quality: DefaultQuality,
    /// `allowed_sizes`, canonical version names (`300x400`, `w200`, `full_size`), if restricted.
    pub allowed_sizes: Option<Vec<String>>,
    /// `named_versions`: a last segment without an extension (`thumb`) stands for this version
    /// file (`x150.jpg`), with the same answer and cache entry.
    pub named: std::collections::BTreeMap<String, String>,
}

impl Rules {
    /// Rules that accept any well-formed name (every format, the largest numbers): for checking
    /// the form of a version file on its own.
    pub fn lenient() -> Rules {
        Rules {
            maximum_width: MAX_NUMBER,
            maximum_height: MAX_NUMBER,
            ..Rules::default()
        }
    }
}

/// Default quality per lossy format.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DefaultQuality {
    /// JPEG (`default_quality`, seed default 75).
    pub jpeg: u8,
    /// WebP (75).
    pub webp: u8,
    /// AVIF (50).
    pub avif: u8,
}

impl Default for DefaultQuality {
    fn default() -> Self {
        DefaultQuality {
            jpeg: 75,
            webp: 75,
            avif: 50,
        }
    }
}

impl DefaultQuality {
    /// The default quality for a format (PNG and GIF report 100: they ignore it).
    pub fn for_format(&self, format: Format) -> u8 {
        match format {
            Format::Jpeg => self.jpeg,
            Format::Webp => self.webp,
            Format::Avif => self.avif,
            Format::Png | Format::Gif => 100,
        }
    }
}

impl Default for Rules {
    fn default() -> Self {
        Rules {
            maximum_width: 2048,
            maximum_height: 2048,
            whitelist: Format::ALL.to_vec(),
            default_quality: DefaultQuality::default(),
            allowed_sizes: None,
            named: std::collections::BTreeMap::new(),
        }
    }
}

/// A parsed, validated image request.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct ImageRequest {
    /// `model` (e.g. `product`).
    pub model: String,
    /// `type` (e.g. `image`).
    pub kind: String,
    /// `id` (e.g. `10855050`).
    pub id: String,
    /// The geometry.
    pub version: Version,
    /// The quality asked for, `None` when it is the format's default (so equivalent names share a key).
    pub quality: Option<u8>,
    /// The output format named by the extension.
    pub format: Format,
}

/// A canonical cache key: `{model}/{type}/{id}/{canonical file name}`.
///
/// Equivalent URLs produce the same key; it is also the result store's object key below its prefix.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct CacheKey(String);

impl CacheKey {
    /// The key as a string.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for CacheKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl ImageRequest {
    /// Parses and validates a request path (without the query). Never allocates more than the parts.
    pub fn parse(path: &str, rules: &Rules) -> Result<ImageRequest, RequestError> {
        let rest = path.strip_prefix('/').ok_or(RequestError::NoRoute)?;
        let mut parts = rest.split('/');
        let (Some(model), Some(kind), Some(id), Some(file), None) = (
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
        ) else {
            return Err(RequestError::NoRoute);
        };
        if !valid_segment(model, 64, false) || !valid_segment(kind, 64, false) {
            return Err(RequestError::NoRoute);
        }
        if !valid_segment(id, 128, true) {
            return Err(RequestError::NoRoute);
        }
        // A named version (`thumb`) is its file (`x150.jpg`): one answer, one cache entry.
        let file = match rules.named.get(file) {
            Some(named) if !file.contains('.') => named.as_str(),
            _ => file,
        };
        let (stem, ext) = file.rsplit_once('.').ok_or(RequestError::NoRoute)?;
        if ext.is_empty() || ext.len() > 8 || !ext.bytes().all(|b| b.is_ascii_alphanumeric()) {
            return Err(RequestError::NoRoute);
        }
        // The stem may only hold the characters of the grammar; anything else is no route.
        if stem.is_empty()
            || stem.len() > 32
            || !stem
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
        {
            return Err(RequestError::NoRoute);
        }
        // `-q{N}`, or `-c{N}` (the seed's "compression" spelling of the same thing).
        let suffix = stem.rsplit_once('-').and_then(|(v, s)| {
            let digits = s.strip_prefix('q').or_else(|| s.strip_prefix('c'))?;
            Some((v, digits))
        });
        let (version_str, quality) = match suffix {
            Some((v, q)) if !q.is_empty() && q.bytes().all(|b| b.is_ascii_digit()) => {
                let q = parse_number(q)?;
                if q > 100 {
                    return Err(RequestError::OutOfRange);
                }
                (v, Some(q as u8))
            }
            _ => (stem, None),
        };
        let version = parse_version(version_str)?;
        let format = Format::from_ext(ext).ok_or(RequestError::ExtensionNotAllowed)?;
        if !rules.whitelist.contains(&format) {
            return Err(RequestError::ExtensionNotAllowed);
        }
        if version.width().is_some_and(|w| w > rules.maximum_width)
            || version.height().is_some_and(|h| h > rules.maximum_height)
        {
            return Err(RequestError::TooLarge);
        }
        if let Some(allowed) = &rules.allowed_sizes {
            let name = version.to_string();
            if !allowed.contains(&name) {
                return Err(RequestError::SizeNotAllowed);
            }
        }
        let quality = match quality {
            Some(q) if !format.uses_quality() => {
                // PNG and GIF ignore Q: every -q form shares the one entry.
                let _ = q;
                None
            }
            Some(q) if q == rules.default_quality.for_format(format) => None,
            other => other,
        };
        Ok(ImageRequest {
            model: model.to_owned(),
            kind: kind.to_owned(),
            id: id.to_owned(),
            version,
            quality,
            format,
        })
    }

    /// Parses the path of an original, `/{model}/{type}/{id}` (the upload endpoints), with the
    /// same rules for each name as an image URL. The version is `full_size.jpg`, unused.
    pub fn parse_original(path: &str) -> Result<ImageRequest, RequestError> {
        let rest = path.strip_prefix('/').ok_or(RequestError::NoRoute)?;
        let mut parts = rest.split('/');
        let (Some(model), Some(kind), Some(id), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(RequestError::NoRoute);
        };
        if !valid_segment(model, 64, false)
            || !valid_segment(kind, 64, false)
            || !valid_segment(id, 128, true)
        {
            return Err(RequestError::NoRoute);
        }
        Ok(ImageRequest {
            model: model.to_owned(),
            kind: kind.to_owned(),
            id: id.to_owned(),
            version: Version::FullSize,
            quality: None,
            format: Format::Jpeg,
        })
    }

    /// The canonical file name for an output format: `{version}[-q{Q}].{ext}`.
    ///
    /// `format` may differ from [`ImageRequest::format`] when `auto_format` picked another one; the
    /// quality then follows the picked format's default unless the URL named one.
    pub fn canonical_name(&self, format: Format) -> String {
        let mut name = String::with_capacity(24);
        self.push_canonical_name(&mut name, format);
        name
    }

    /// Appends [`ImageRequest::canonical_name`] to `out`.
    fn push_canonical_name(&self, out: &mut String, format: Format) {
        use fmt::Write;
        // (Writing to a String cannot fail.)
        let _ = write!(out, "{}", self.version);
        if let (Some(q), true) = (self.quality, format.uses_quality()) {
            let _ = write!(out, "-q{q}");
        }
        out.push('.');
        out.push_str(format.ext());
    }

    /// `{model}/{type}/{id}`: names the original (cache tags, purge, originals cache).
    pub fn original_id(&self) -> String {
        let mut id = String::with_capacity(self.model.len() + self.kind.len() + self.id.len() + 2);
        self.push_original_id(&mut id);
        id
    }

    fn push_original_id(&self, out: &mut String) {
        out.push_str(&self.model);
        out.push('/');
        out.push_str(&self.kind);
        out.push('/');
        out.push_str(&self.id);
    }

    /// The cache key for this request rendered as `format`. Built in one string: it is made on every
    /// request, hits included.
    pub fn cache_key(&self, format: Format) -> CacheKey {
        let mut key =
            String::with_capacity(self.model.len() + self.kind.len() + self.id.len() + 28);
        self.push_original_id(&mut key);
        key.push('/');
        self.push_canonical_name(&mut key, format);
        CacheKey(key)
    }

    /// The cache key for this request rendered as `format` from a `?source=` original whose URL
    /// digest is `source_digest`: `{model}/{type}/{id}/source-{digest}/{canonical}`. It never equals
    /// an id's own key (an override cannot poison the normal entry), and purging the id still drops it.
    pub fn source_cache_key(&self, format: Format, source_digest: &str) -> CacheKey {
        CacheKey(format!(
            "{}/source-{}/{}",
            self.original_id(),
            source_digest,
            self.canonical_name(format)
        ))
    }

    /// The quality to encode with: the URL's, else the format's default.
    pub fn effective_quality(&self, format: Format, defaults: &DefaultQuality) -> u8 {
        self.quality.unwrap_or_else(|| defaults.for_format(format))
    }
}

/// Every value of the query parameter `name`, percent- and `+`-decoded (as a browser encodes a
/// form), in order. Names are compared after decoding, so `sour%63e=` is `source=`: the parameters a
/// check looks at are the ones the request means. Empty when absent.
pub fn query_values(query: Option<&str>, name: &str) -> Vec<String> {
    url::form_urlencoded::parse(query.unwrap_or("").as_bytes())
        .filter(|(k, _)| k == name)
        .map(|(_, v)| v.into_owned())
        .collect()
}

/// `[a-z0-9_-]` (model, type) or `[A-Za-z0-9_-]` (id), 1..=max bytes.
fn valid_segment(s: &str, max: usize, upper: bool) -> bool {
    !s.is_empty()
        && s.len() <= max
        && s.bytes().all(|b| {
            b.is_ascii_lowercase()
                || b.is_ascii_digit()
                || b == b'_'
                || b == b'-'
                || (upper && b.is_ascii_uppercase())
        })
}

/// A canonical decimal 1..=99999: digits only, no leading zero. Digits that break those rules are
/// out of range (400); the caller has already checked the text is digits.
fn parse_number(s: &str) -> Result<u32, RequestError> {
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return Err(RequestError::UnknownVersion);
    }
    if s.len() > 5 || s.starts_with('0') {
        return Err(RequestError::OutOfRange);
    }
    let n: u32 = s.parse().map_err(|_| RequestError::OutOfRange)?;
    if n == 0 || n > MAX_NUMBER {
        return Err(RequestError::OutOfRange);
    }
    Ok(n)
}

fn is_digits(s: &str) -> bool {
    !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit())
}

/// Tries the version forms in the grammar's order: `{W}x{H}`, `x{N}`, `w{N}`, `h{N}`, `full_size`.
fn parse_version(s: &str) -> Result<Version, RequestError> {
    if let Some((w, h)) = s.split_once('x') {
        if is_digits(w) && is_digits(h) {
            return Ok(Version::Cover {
                width: parse_number(w)?,
                height: parse_number(h)?,
            });
        }
        if w.is_empty() && is_digits(h) {
            let n = parse_number(h)?;
            return Ok(Version::Cover {
                width: n,
                height: n,
            });
        }
    }
    if let Some(n) = s.strip_prefix('w').filter(|n| is_digits(n)) {
        return Ok(Version::Width(parse_number(n)?));
    }
    if let Some(n) = s.strip_prefix('h').filter(|n| is_digits(n)) {
        return Ok(Version::Height(parse_number(n)?));
    }
    if s == "full_size" {
        return Ok(Version::FullSize);
    }
    Err(RequestError::UnknownVersion)
}

/// Parses a version name alone (`300x400`, `w200`, `full_size`), for `allowed_sizes` and `warm`.
pub fn parse_version_name(s: &str) -> Result<Version, RequestError> {
    parse_version(s)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn parse(p: &str) -> Result<ImageRequest, RequestError> {
        ImageRequest::parse(p, &Rules::default())
    }

    fn key(p: &str) -> String {
        let r = parse(p).expect(p);
        r.cache_key(r.format).to_string()
    }

    #[test]
    fn query_values_decode_names_and_values() {
        let q = Some("a=1&source=http%3A%2F%2Fx%2Fa+b.jpg&sour%63e=2&sources=3&source");
        assert_eq!(
            query_values(q, "source"),
            vec!["http://x/a b.jpg".to_owned(), "2".to_owned(), String::new()]
        );
        assert_eq!(query_values(q, "a"), vec!["1".to_owned()]);
        assert!(query_values(q, "s").is_empty());
        assert!(query_values(None, "source").is_empty());
    }

    #[test]
    fn source_keys_never_equal_the_ids_own() {
        let r = ImageRequest::parse("/p/i/1/w300.jpg", &Rules::default()).expect("parses");
        let own = r.cache_key(Format::Jpeg);
        let other = r.source_cache_key(Format::Jpeg, "0123456789abcdef0123456789abcdef");
        assert_eq!(own.as_str(), "p/i/1/w300.jpg");
        assert_eq!(
            other.as_str(),
            "p/i/1/source-0123456789abcdef0123456789abcdef/w300.jpg"
        );
        assert!(other.as_str().starts_with("p/i/1/"));
    }

    #[test]
    fn seed_cases_parse() {
        let cases = [
            (
                "300x400.jpg",
                Version::Cover {
                    width: 300,
                    height: 400,
                },
                None,
            ),
            (
                "x300.jpg",
                Version::Cover {
                    width: 300,
                    height: 300,
                },
                None,
            ),
            ("w300.jpg", Version::Width(300), None),
            ("full_size.jpg", Version::FullSize, None),
            (
                "300x400-q10.jpg",
                Version::Cover {
                    width: 300,
                    height: 400,
                },
                Some(10),
            ),
            (
                "x300-q10.jpg",
                Version::Cover {
                    width: 300,
                    height: 300,
                },
                Some(10),
            ),
            ("w300-q10.jpg", Version::Width(300), Some(10)),
            ("full_size-q10.jpg", Version::FullSize, Some(10)),
            ("h250.webp", Version::Height(250), None),
        ];
        for (file, version, quality) in cases {
            let r = parse(&format!("/product/image/123/{file}")).expect(file);
            assert_eq!(r.version, version, "{file}");
            assert_eq!(r.quality, quality, "{file}");
            assert_eq!(r.model, "product");
            assert_eq!(r.kind, "image");
            assert_eq!(r.id, "123");
        }
    }

    #[test]
    fn refusals_table() {
        use RequestError::*;
        let cases: &[(&str, RequestError)] = &[
            ("/product/image/1/random.jpg", UnknownVersion),
            ("/product/image/1/300x.jpg", UnknownVersion),
            ("/product/image/1/wx.jpg", UnknownVersion),
            ("/product/image/1/w0.jpg", OutOfRange),
            ("/product/image/1/w0300.jpg", OutOfRange),
            ("/product/image/1/0x10.jpg", OutOfRange),
            ("/product/image/1/w100000.jpg", OutOfRange),
            ("/product/image/1/w300-q0.jpg", OutOfRange),
            ("/product/image/1/w300-q101.jpg", OutOfRange),
            ("/product/image/1/w300-q075.jpg", OutOfRange),
            ("/product/image/1/w3000.jpg", TooLarge),
            ("/product/image/1/300x2049.jpg", TooLarge),
            ("/product/image/1/h2049.jpg", TooLarge),
            ("/product/image/1/w300.bmp", ExtensionNotAllowed),
            ("/product/image/1/w300.BMP", ExtensionNotAllowed),
            ("/product/image/1/w300-c0.jpg", OutOfRange),
            ("/product/image/1/w300-c101.jpg", OutOfRange),
            ("/product/image/1/w300-c.jpg", UnknownVersion),
            ("/product/image/1/w300-x60.jpg", UnknownVersion),
            ("/product/image/1/w300-q60-c60.jpg", UnknownVersion),
            ("/product/image/1/w300.j_g", NoRoute),
            ("/product/image/1/w300", NoRoute),
            ("/product/image/1/", NoRoute),
            ("/product/image/1", NoRoute),
            ("/product/image/1/w300.jpg/", NoRoute),
            ("/product/image/%2e%2e%2f/w300.jpg", NoRoute),
            ("/product/image/../w300.jpg", NoRoute),
            ("/product/image/a.b/w300.jpg", NoRoute),
            ("/product/image/1%00/w300.jpg", NoRoute),
            ("/product/image/１２/w300.jpg", NoRoute),
            ("/Product/image/1/w300.jpg", NoRoute),
            ("product/image/1/w300.jpg", NoRoute),
            ("//image/1/w300.jpg", NoRoute),
            ("/product/image/1/w300..jpg", NoRoute),
            ("/product/image/1/.jpg", NoRoute),
        ];
        for (path, want) in cases {
            assert_eq!(parse(path).as_ref().err(), Some(want), "{path}");
        }
        let long_id = format!("/product/image/{}/w300.jpg", "a".repeat(129));
        assert_eq!(parse(&long_id), Err(NoRoute));
        let ok_id = format!("/product/image/{}/w300.jpg", "A-_z9".repeat(25));
        assert!(parse(&ok_id).is_ok());
    }

    #[test]
    fn whitelist_and_allowed_sizes() {
        let rules = Rules {
            whitelist: vec![Format::Jpeg],
            allowed_sizes: Some(vec!["w200".into(), "300x300".into()]),
            ..Rules::default()
        };
        assert!(ImageRequest::parse("/a/b/1/w200.jpg", &rules).is_ok());
        assert!(ImageRequest::parse("/a/b/1/x300.jpeg", &rules).is_ok());
        assert_eq!(
            ImageRequest::parse("/a/b/1/w200.png", &rules),
            Err(RequestError::ExtensionNotAllowed)
        );
        assert_eq!(
            ImageRequest::parse("/a/b/1/w201.jpg", &rules),
            Err(RequestError::SizeNotAllowed)
        );
    }

    #[test]
    fn equivalent_names_share_a_key() {
        assert_eq!(key("/p/i/1/x300.jpg"), "p/i/1/300x300.jpg");
        assert_eq!(key("/p/i/1/300x300.jpeg"), "p/i/1/300x300.jpg");
        assert_eq!(key("/p/i/1/300x300-q75.jpg"), "p/i/1/300x300.jpg");
        assert_eq!(key("/p/i/1/300x300-q60.jpg"), "p/i/1/300x300-q60.jpg");
        assert_eq!(key("/p/i/1/w10-q75.webp"), "p/i/1/w10.webp");
        assert_eq!(key("/p/i/1/w10-q50.avif"), "p/i/1/w10.avif");
        assert_eq!(key("/p/i/1/w10-q75.avif"), "p/i/1/w10-q75.avif");
        assert_eq!(key("/p/i/1/w10-q20.png"), "p/i/1/w10.png");
        assert_eq!(key("/p/i/1/full_size.gif"), "p/i/1/full_size.gif");
        // The seed's `-c{N}` (compression) is `-q{N}`.
        assert_eq!(key("/p/i/1/x50-c60.jpg"), "p/i/1/50x50-q60.jpg");
        assert_eq!(key("/p/i/1/x50-c60.jpg"), key("/p/i/1/x50-q60.jpg"));
        assert_eq!(key("/p/i/1/300x300-c75.jpg"), "p/i/1/300x300.jpg");
        // Extensions in any case are the same format.
        assert_eq!(key("/p/i/1/w300.JPG"), "p/i/1/w300.jpg");
        assert_eq!(key("/p/i/1/w300.Jpeg"), "p/i/1/w300.jpg");
        assert_eq!(key("/p/i/1/w300.Png"), "p/i/1/w300.png");
        assert_eq!(key("/p/i/1/w300.WEBP"), "p/i/1/w300.webp");
    }

    fn arb_version() -> impl Strategy<Value = Version> {
        prop_oneof![
            (1u32..=2048, 1u32..=2048).prop_map(|(width, height)| Version::Cover { width, height }),
            (1u32..=2048).prop_map(Version::Width),
            (1u32..=2048).prop_map(Version::Height),
            Just(Version::FullSize),
        ]
    }

    proptest! {
        #[test]
        fn never_panics(s in "\\PC{0,80}") {
            let _ = parse(&s);
            let _ = parse(&format!("/product/image/1/{s}"));
        }

        #[test]
        fn canonical_round_trips(
            model in "[a-z0-9_-]{1,64}",
            kind in "[a-z0-9_-]{1,64}",
            id in "[A-Za-z0-9_-]{1,128}",
            version in arb_version(),
            q in proptest::option::of(1u8..=100),
            fi in 0usize..5,
        ) {
            let format = Format::ALL[fi];
            let name = match q {
                Some(q) => format!("{version}-q{q}.{}", format.ext()),
                None => format!("{version}.{}", format.ext()),
            };
            let req = parse(&format!("/{model}/{kind}/{id}/{name}")).expect("valid");
            prop_assert_eq!(req.version, version);
            prop_assert_eq!(req.format, format);
            // Parsing the canonical name gives the same request back (canonical is a fixed point).
            let canon = format!("/{}/{}/{}/{}", model, kind, id, req.canonical_name(format));
            let again = parse(&canon).expect("canonical parses");
            prop_assert_eq!(&again, &req);
            prop_assert_eq!(again.cache_key(format), req.cache_key(format));
        }
    }
}
