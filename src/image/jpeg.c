/*
 * The one C function behind src/image/jpeg.rs: decode a JPEG held in memory with the system
 * libjpeg-turbo (the same libjpeg.so.62 libvips' loader calls), scaled by 1/denom and, when asked,
 * cropped to a band of columns with jpeg_crop_scanline, so the columns outside it are entropy-decoded
 * (unavoidable) but never inverse-transformed, upsampled or colour-converted.
 *
 * It lives in C because libjpeg reports errors by calling error_exit, which must not return: the
 * standard way out is longjmp back to a setjmp in the caller, and a longjmp must never cross Rust
 * frames. Every libjpeg call happens between the setjmp below and the return.
 *
 * Warnings count as errors, like libvips' fail_on=warning (truncated or damaged data is an
 * error, never a grey image): libjpeg warns, and carries on with made-up data, on a premature end of
 * data or corrupt entropy-coded segments.
 */
#define _POSIX_C_SOURCE 199309L
#include <setjmp.h>
#include <stddef.h>
#include <stdio.h>
#include <string.h>
#include <time.h>
#include <jpeglib.h>

/* Return codes; mirrored in jpeg.rs. */
#define IS_JPEG_OK 0
#define IS_JPEG_UNSUPPORTED 1 /* not 1 or 3 components the way libvips reads them: use libvips */
#define IS_JPEG_CORRUPT 2     /* libjpeg error or warning: the original's fault */
#define IS_JPEG_MISMATCH 3    /* the sizes disagree with the caller's (libvips') header */
#define IS_JPEG_SCANS 4       /* more scans than max_scans */
#define IS_JPEG_TIMEOUT 5     /* the deadline passed */

struct is_jpeg_error {
    struct jpeg_error_mgr pub;
    jmp_buf jump;
};

static void is_jpeg_error_exit(j_common_ptr cinfo)
{
    struct is_jpeg_error *err = (struct is_jpeg_error *)cinfo->err;
    longjmp(err->jump, 1);
}

static void is_jpeg_emit_message(j_common_ptr cinfo, int level)
{
    /* Level -1 is a warning; 0 and up are trace messages, ignored. */
    if (level < 0) {
        struct is_jpeg_error *err = (struct is_jpeg_error *)cinfo->err;
        err->pub.num_warnings++;
        longjmp(err->jump, 1);
    }
}

static void is_jpeg_output_message(j_common_ptr cinfo)
{
    (void)cinfo; /* nothing goes to stderr */
}

/*
 * The second line of defence behind the marker walk in markers.rs, and the render deadline: libjpeg
 * calls the progress monitor once per iMCU row while it absorbs input (every scan of a progressive
 * file) and once per jpeg_read_scanlines call, so it sees a scan count over the limit, or a deadline
 * that has passed, within one row of work. Leaving by longjmp from here is what djpeg -maxscans does.
 */
struct is_jpeg_progress {
    struct jpeg_progress_mgr pub;
    unsigned int max_scans;
    int has_deadline;
    struct timespec deadline;
    unsigned int calls;
    int reason; /* IS_JPEG_SCANS or IS_JPEG_TIMEOUT once the monitor stopped the decode */
};

static int is_jpeg_past(const struct timespec *deadline)
{
    struct timespec now;
    if (clock_gettime(CLOCK_MONOTONIC, &now) != 0)
        return 0;
    return now.tv_sec > deadline->tv_sec ||
           (now.tv_sec == deadline->tv_sec && now.tv_nsec >= deadline->tv_nsec);
}

static void is_jpeg_progress_monitor(j_common_ptr cinfo)
{
    struct is_jpeg_progress *p = (struct is_jpeg_progress *)cinfo->progress;
    struct is_jpeg_error *err = (struct is_jpeg_error *)cinfo->err;
    j_decompress_ptr d = (j_decompress_ptr)cinfo;
    if (d->input_scan_number > 0 && (unsigned int)d->input_scan_number > p->max_scans) {
        p->reason = IS_JPEG_SCANS;
        longjmp(err->jump, 1);
    }
    /* The clock every 16 rows: a row is microseconds of work, a clock read tens of nanoseconds. */
    if (p->has_deadline && (p->calls++ & 15) == 0 && is_jpeg_past(&p->deadline)) {
        p->reason = IS_JPEG_TIMEOUT;
        longjmp(err->jump, 1);
    }
}

/*
 * Decodes data[0..len) at 1/denom scale into out (out_cap bytes), as expect_height rows of
 * *got_width pixels of bands bytes each, back to back.
 *
 * expect_width x expect_height is libvips' size for the same shrink, which rounds down where libjpeg
 * rounds up (1001 / 8: libvips 125, libjpeg 126): libjpeg's extra last column and row, if any, are
 * decoded and dropped, as libvips does. Any other size or band count is IS_JPEG_MISMATCH, so the
 * caller's buffer arithmetic can trust them; out_cap must hold (expect_width + 1) x
 * (expect_height + 1) pixels. When want_width is less than expect_width, only columns
 * [want_left, want_left + want_width) are asked for; libjpeg widens that band to whole iMCUs, and
 * *got_left / *got_width say which columns the rows hold.
 *
 * More than max_scans scans is IS_JPEG_SCANS; budget_ms >= 0 is a deadline that many milliseconds
 * from now, past which the decode stops with IS_JPEG_TIMEOUT (budget_ms < 0: no deadline).
 */
int is_jpeg_decode(const unsigned char *data, unsigned long len, unsigned int denom,
                   unsigned int expect_width, unsigned int expect_height, int bands,
                   unsigned int want_left, unsigned int want_width, unsigned char *out,
                   size_t out_cap, unsigned int *got_left, unsigned int *got_width,
                   unsigned int max_scans, long budget_ms)
{
    struct jpeg_decompress_struct cinfo;
    struct is_jpeg_error err;
    struct is_jpeg_progress progress;
    JDIMENSION left, width, kept, y;
    size_t stride, kept_stride;

    memset(&progress, 0, sizeof progress);
    progress.pub.progress_monitor = is_jpeg_progress_monitor;
    progress.max_scans = max_scans;
    if (budget_ms >= 0 && clock_gettime(CLOCK_MONOTONIC, &progress.deadline) == 0) {
        progress.has_deadline = 1;
        progress.deadline.tv_sec += budget_ms / 1000;
        progress.deadline.tv_nsec += (budget_ms % 1000) * 1000000L;
        if (progress.deadline.tv_nsec >= 1000000000L) {
            progress.deadline.tv_sec += 1;
            progress.deadline.tv_nsec -= 1000000000L;
        }
    }

    cinfo.err = jpeg_std_error(&err.pub);
    err.pub.error_exit = is_jpeg_error_exit;
    err.pub.emit_message = is_jpeg_emit_message;
    err.pub.output_message = is_jpeg_output_message;
    /* jpeg_create_decompress clears cinfo.mem before anything can fail, so the jump target may
     * destroy whatever exists by then. */
    if (setjmp(err.jump)) {
        jpeg_destroy_decompress(&cinfo);
        /* Read through a volatile lvalue: the monitor set it after setjmp, behind the compiler's back. */
        int reason = ((volatile struct is_jpeg_progress *)&progress)->reason;
        return reason ? reason : IS_JPEG_CORRUPT;
    }
    jpeg_create_decompress(&cinfo);
    cinfo.progress = &progress.pub;
    jpeg_mem_src(&cinfo, data, len);
    jpeg_read_header(&cinfo, TRUE);

    /* What libvips' jpegload does for these: three components (YCbCr, or RGB by Adobe marker) come
     * out as RGB, one as grey. CMYK/YCCK (and its Adobe inversion) stay with libvips. */
    if (bands == 3 && cinfo.num_components == 3 &&
        (cinfo.jpeg_color_space == JCS_YCbCr || cinfo.jpeg_color_space == JCS_RGB))
        cinfo.out_color_space = JCS_RGB;
    else if (bands == 1 && cinfo.num_components == 1 && cinfo.jpeg_color_space == JCS_GRAYSCALE)
        cinfo.out_color_space = JCS_GRAYSCALE;
    else {
        jpeg_destroy_decompress(&cinfo);
        return IS_JPEG_UNSUPPORTED;
    }
    cinfo.scale_num = 1;
    cinfo.scale_denom = denom;
    jpeg_start_decompress(&cinfo);
    if (cinfo.output_width < expect_width || cinfo.output_width - expect_width > 1 ||
        cinfo.output_height < expect_height || cinfo.output_height - expect_height > 1 ||
        cinfo.output_components != bands || want_width == 0 || want_left >= expect_width ||
        want_width > expect_width - want_left) {
        jpeg_destroy_decompress(&cinfo);
        return IS_JPEG_MISMATCH;
    }

    left = 0;
    width = cinfo.output_width;
    if (want_width < expect_width) {
        left = want_left;
        width = want_width;
        jpeg_crop_scanline(&cinfo, &left, &width);
    }
    stride = (size_t)width * (size_t)bands;
    if (left >= expect_width || stride == 0 || out_cap / stride < (size_t)cinfo.output_height) {
        jpeg_destroy_decompress(&cinfo);
        return IS_JPEG_MISMATCH;
    }
    while (cinfo.output_scanline < cinfo.output_height) {
        JSAMPROW rows[16];
        JDIMENSION n = cinfo.output_height - cinfo.output_scanline, i;
        if (n > 16)
            n = 16;
        for (i = 0; i < n; i++)
            rows[i] = out + (size_t)(cinfo.output_scanline + i) * stride;
        jpeg_read_scanlines(&cinfo, rows, n);
    }
    /* Reads on to the EOI marker: a file cut short after the last row still warns, so still fails. */
    jpeg_finish_decompress(&cinfo);
    jpeg_destroy_decompress(&cinfo);

    /* Drop libjpeg's extra column (rows then move down in memory, never onto one not yet moved). */
    kept = width;
    if (left + width > expect_width)
        kept = expect_width - left;
    kept_stride = (size_t)kept * (size_t)bands;
    if (kept != width)
        for (y = 1; y < expect_height; y++)
            memmove(out + (size_t)y * kept_stride, out + (size_t)y * stride, kept_stride);
    *got_left = left;
    *got_width = kept;
    return IS_JPEG_OK;
}
