//! The only file that touches libvips (stub, being written).
use super::{DecodeLimits, ImageError, RenderSpec, Rendered};
/// Renders one variant.
pub fn render(
    _original: &[u8],
    _spec: &RenderSpec,
    _limits: &DecodeLimits,
) -> Result<Rendered, ImageError> {
    Err(ImageError::Internal("not yet".into()))
}
