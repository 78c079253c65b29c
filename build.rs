//! Compiles `src/image/jpeg.c`, the libjpeg-turbo decode behind `src/image/jpeg.rs`, against the
//! system libjpeg (Debian's `libjpeg62-turbo-dev`, which `libvips-dev` already pulls in).

fn main() {
    println!("cargo:rerun-if-changed=src/image/jpeg.c");
    cc::Build::new()
        .file("src/image/jpeg.c")
        .opt_level(2)
        .warnings(true)
        .extra_warnings(true)
        .warnings_into_errors(true)
        .compile("is_jpeg");
    println!("cargo:rustc-link-lib=jpeg");
}
