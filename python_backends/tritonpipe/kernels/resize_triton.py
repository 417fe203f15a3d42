"""The Triton kernels of :mod:`.batch_resize`, in a module of their own so that Triton is imported only where
they are used (and after ``TRITON_INTERPRET`` is set, which Triton reads at import).

Both kernels write one block of output pixels of one image per program with :func:`_bilinear`; they differ in
where an image's address, sides, strides and scales come from.
"""

import torch
import triton
import triton.language as tl


@triton.jit
def _bilinear(base, height, width, stride_c, stride_h, stride_w, swap, scale_y, scale_x, norm_ptr, out_base,
              out_h, out_w, C: tl.constexpr, NORMALISE: tl.constexpr, BLOCK: tl.constexpr):
    """One block of one image's output: every channel of BLOCK output pixels."""
    pixels = out_h * out_w
    offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    inside = offsets < pixels
    oy = offsets // out_w
    ox = offsets % out_w
    # PyTorch's area_pixel_compute_source_index, in float32
    sy = tl.maximum(scale_y * (oy.to(tl.float32) + 0.5) - 0.5, 0.0)
    sx = tl.maximum(scale_x * (ox.to(tl.float32) + 0.5) - 0.5, 0.0)
    y0 = sy.to(tl.int32)
    x0 = sx.to(tl.int32)
    ly = sy - y0.to(tl.float32)
    lx = sx - x0.to(tl.float32)
    y1 = y0 + (y0 < height - 1).to(tl.int32)
    x1 = x0 + (x0 < width - 1).to(tl.int32)
    top0 = y0.to(tl.int64) * stride_h
    top1 = y1.to(tl.int64) * stride_h
    left0 = x0.to(tl.int64) * stride_w
    left1 = x1.to(tl.int64) * stride_w
    for c in tl.static_range(C):
        source = tl.where(swap != 0, C - 1 - c, c)
        plane = base + source.to(tl.int64) * stride_c
        v00 = tl.load(plane + top0 + left0, mask=inside, other=0).to(tl.float32)
        v01 = tl.load(plane + top0 + left1, mask=inside, other=0).to(tl.float32)
        v10 = tl.load(plane + top1 + left0, mask=inside, other=0).to(tl.float32)
        v11 = tl.load(plane + top1 + left1, mask=inside, other=0).to(tl.float32)
        value = (1.0 - ly) * ((1.0 - lx) * v00 + lx * v01) + ly * ((1.0 - lx) * v10 + lx * v11)
        if NORMALISE:
            value = tl.math.div_rn(value - tl.load(norm_ptr + c), tl.load(norm_ptr + C + c))
        tl.store(out_base + c * pixels + offsets, value.to(out_base.dtype.element_ty), mask=inside)


@triton.jit
def resize_kernel(
    table_ptr,  # int64 [B, 7]: address, H, W, stride C, stride H, stride W, swap
    scale_ptr,  # float32 [B, 2]: H / out_h and W / out_w, rounded as PyTorch rounds them
    norm_ptr,  # float32 [2, C]: mean, then std
    out_ptr,
    out_h,
    out_w,
    C: tl.constexpr,
    IN_TYPE: tl.constexpr,
    NORMALISE: tl.constexpr,
    BLOCK: tl.constexpr,
):
    b = tl.program_id(1)
    row = table_ptr + b * 7
    base = tl.load(row).to(tl.pointer_type(IN_TYPE))
    out_base = out_ptr + b.to(tl.int64) * C * out_h * out_w
    _bilinear(base, tl.load(row + 1), tl.load(row + 2), tl.load(row + 3), tl.load(row + 4), tl.load(row + 5),
              tl.load(row + 6), tl.load(scale_ptr + b * 2), tl.load(scale_ptr + b * 2 + 1), norm_ptr, out_base,
              out_h, out_w, C, NORMALISE, BLOCK)


# one image: its address, sides, strides and scales as arguments, so that no table is filled, pinned and
# copied (on an H100 a batch of one took 148 us of host time with the table, 53 with arguments).  Not
# specialised on their values, so that every image runs one compiled variant
@triton.jit(do_not_specialize=["address", "height", "width", "stride_c", "stride_h", "stride_w", "swap",
                               "scale_y", "scale_x"])
def resize_one_kernel(address, height, width, stride_c, stride_h, stride_w, swap, scale_y, scale_x, norm_ptr,
                      out_ptr, out_h, out_w, C: tl.constexpr, IN_TYPE: tl.constexpr, NORMALISE: tl.constexpr,
                      BLOCK: tl.constexpr):
    _bilinear(address.to(tl.pointer_type(IN_TYPE)), height, width, stride_c, stride_h, stride_w, swap, scale_y,
              scale_x, norm_ptr, out_ptr, out_h, out_w, C, NORMALISE, BLOCK)


#: the element type the kernels read, by input dtype
TYPES = {torch.uint8: tl.uint8, torch.float16: tl.float16, torch.float32: tl.float32}
cdiv = triton.cdiv
