"""Image stages with torchpipe's names: decode, colour, resize, layout conversion.

``*Mat`` stages work on HxWxC uint8 CPU tensors (OpenCV's layout); ``*Tensor`` stages
work on 1xCxHxW tensors and run on the instance's GPU when it has one.
"""

from __future__ import annotations

import functools
import logging
import time
from dataclasses import dataclass
from typing import Any

import torch

from ..errors import ConfigError, RequestError
from ..kernels import batch_resize, dali_decode, decode, geometry, jpeg, nvimgcodec, nvjpeg
from ..kernels import color as color_kernels
from ..kernels.errors import DecodeError
from ..kernels.pillow_resize import NEWEST, RELEASES, pillow_resize, pillow_resize_hwc, release_line
from ..spec import ENCODED_IMAGE, SpecError, TensorSpec
from .base import DATA, ERROR, RESULT, MapStage, Param, Stage, cpu_threads, register

log = logging.getLogger("tritonpipe")
#: cpu_decoder_balance logs its share when it has moved by 0.05 or more, at most once in this many seconds
SHARE_LOG_SECONDS = 10.0

_SIDE = dict(low=1, high=geometry.MAX_SIDE)
_COLOR = Param(str, "rgb", choices=color_kernels.COLORS, doc="channel order of the output")


def _tensor(data: Any, what: str, dtype: torch.dtype | None = None) -> torch.Tensor:
    if not isinstance(data, torch.Tensor):
        raise RequestError(f"{what} needs a tensor, got {type(data).__name__}")
    if dtype is not None and data.dtype != dtype:
        raise RequestError(f"{what} needs {str(dtype).replace('torch.', '')} input, got {str(data.dtype).replace('torch.', '')}")
    return data


def _bytes(data: Any, what: str) -> torch.Tensor:
    data = _tensor(data, what, torch.uint8)
    if data.dim() == 2 and data.shape[0] == 1:
        data = data[0]
    if data.dim() != 1:
        raise RequestError(f"{what} needs the encoded file as a 1-D uint8 tensor, got shape {tuple(data.shape)}")
    return data


def _request_error(exc: DecodeError) -> RequestError:
    """A kernel's decode error as the request's own: INVALID_ARG, counted under its reason."""
    return RequestError(str(exc), reason=exc.reason)


def _layout(check) -> Any:
    """A request-input checker from a kernel's layout check: its ValueError becomes a RequestError."""

    def checked(data: Any, what: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        data = _tensor(data, what, dtype)
        try:
            check(data, what)
        except ValueError as exc:
            raise RequestError(str(exc)) from None
        return data

    return checked


_nchw = _layout(geometry.check_nchw)
_hwc = _layout(geometry.check_hwc)


def _expect(name: str, spec: TensorSpec, *, rank: int, batched: bool, dtype: str | None = None) -> None:
    if len(spec.shape) != rank or spec.batched != batched or (dtype and spec.dtype != dtype):
        layout = "a 1xCxHxW tensor" if batched else "an HxWxC mat"
        need = f"{dtype} " if dtype else ""
        raise SpecError(f"{name} needs {need}{layout}, but receives {spec.describe()}")


# --- decode -----------------------------------------------------------------------------

_DECODE_PARAMS = {
    "apply_exif": Param(bool, False, doc="rotate/flip JPEGs by their EXIF orientation tag"),
    "max_pixels": Param(
        int, jpeg.MAX_PIXELS, low=1, high=1 << 40,
        doc="images of this many pixels (width x height) or more are refused, from the header, before decoding",
    ),
}


@register("DecodeMat")
class DecodeMat(MapStage):
    """JPEG, PNG, BMP or WebP bytes -> HxWx3 uint8 BGR mat, decoded by OpenCV on the CPU."""

    input_doc = "JPEG, PNG, BMP or WebP bytes, UINT8[n]"
    output_doc = "HxWx3 uint8 BGR mat; sets color=bgr"

    params = _DECODE_PARAMS
    concurrent = True  # a batch's images decode at once on a CPU instance's threads

    def init(self, params: dict[str, Any]) -> None:
        self.apply_exif = params["apply_exif"]
        self.max_pixels = params["max_pixels"]

    def apply(self, data: Any, item: dict[str, Any]) -> Any:
        try:
            image = decode.decode_image_cpu(
                _bytes(data, self.name).cpu(), apply_exif=self.apply_exif, max_pixels=self.max_pixels
            )
        except DecodeError as exc:
            raise _request_error(exc) from None
        item["color"] = "bgr"
        return image

    @classmethod
    def infer(cls, params: dict[str, Any], spec: TensorSpec) -> TensorSpec:
        if not ENCODED_IMAGE.accepts(spec):
            raise SpecError(f"{cls.name} needs encoded bytes UINT8[?], but receives {spec.describe()}")
        return TensorSpec("UINT8", (-1, -1, 3))


@register("DecodeTensor")
class DecodeTensor(Stage):
    """JPEG bytes -> 1x3xHxW uint8 tensor (or HxWx3 with ``data_format=hwc``).

    On a GPU instance a batch is decoded by nvjpeg (through torchvision, or driven directly), by
    nvImageCodec or by DALI, on the hardware JPEG engines where the GPU has them (the README's "GPU
    decoding" says which key does what).  JPEG only: other formats are refused by name
    (``DecodeMat`` reads PNG, BMP and WebP).
    """

    input_doc = "JPEG bytes, UINT8[n]"
    output_doc = "1x3xHxW uint8 (nchw) or HxWx3 (hwc); sets color"

    wants_gpu = True
    params = {
        **_DECODE_PARAMS,
        "color": _COLOR,
        "data_format": Param(str, "nchw", choices=("nchw", "hwc"), doc="output layout"),
        "decoder": Param(
            str, "auto", choices=("auto", *jpeg.GPU_DECODERS),
            doc="GPU decoder: auto (nvjpeg where the GPU has hardware JPEG engines, else torchvision); nvjpeg through "
                "torchvision; nvjpeg's hardware decoder driven directly (interleaved output, submitted without the host "
                "waiting for the engines; A100, H100, H200 and later); nvImageCodec; or DALI's mixed decoder fed the batch "
                "in overlapping chunks (all use the hardware JPEG engines where the GPU has them)",
        ),
        "hw_decoder_load": Param(
            float, nvimgcodec.HW_DECODER_LOAD, low=0.0, high=1.0,
            doc="with decoder=nvimgcodec or dali: share of a batch the hardware JPEG engines take; the CUDA decoder takes the rest",
        ),
        "decode_chunk": Param(
            int, dali_decode.CHUNK, low=1, high=4096,
            doc="with decoder=dali: images per DALI iteration; a batch is cut into chunks that DALI decodes overlapped",
        ),
        "decode_depth": Param(
            int, 0, low=0, high=8,
            doc=f"with decoder=dali: chunks in DALI at once; with decoder=nvjpeg (or auto, where it picks nvjpeg): parts each batch is cut into, each checked "
                f"on a host thread of its own, then submitted to the engines, one call at a time and without waiting for "
                f"them (1: the whole batch in one submission, on the model's thread); 0: the decoder's own ({dali_decode.DEPTH} for dali, "
                f"{nvjpeg.LANES} for nvjpeg)",
        ),
        "decode_threads": Param(
            int, 1, low=1, high=nvimgcodec.MAX_THREADS,
            doc="with decoder=nvimgcodec: decoders that share out each batch and work on it at once, one thread each",
        ),
        "cuda_decoder_share": Param(
            float, 0.0, low=0.0, high=1.0,
            doc="share of each batch's bytes that nvImageCodec's CUDA decoder takes, on a thread of its own, while the "
                "decoder above decodes the rest (the hardware engines and the CUDA decoder at once); needs nvImageCodec",
        ),
        "cpu_decoder_share": Param(
            float, 0.0, low=0.0, high=1.0,
            doc="share of each batch's bytes (the smallest images first) that host threads decode with libjpeg-turbo and "
                "copy to the GPU, each image as soon as it is decoded, while the decoder above decodes the rest (host "
                "cores the GPU's decoders leave idle); not with cuda_decoder_share",
        ),
        "cpu_decoder_threads": Param(
            int, 1, low=1, high=64,
            doc="with cpu_decoder_share or cpu_decoder_balance: host threads of each instance that decode its share",
        ),
        "cpu_decoder_balance": Param(
            bool, False,
            doc=f"on a GPU: move the host's share (cpu_decoder_share, from {jpeg.BALANCE_START} where it is 0) after "
                f"each batch toward the one at which the host threads take as long as the GPU decoder's part, timed "
                f"with CUDA events (up to {jpeg.ShareBalance.HIGH} of the bytes; a batch of fewer than "
                f"{jpeg.ShareBalance.MIN_BATCH} images is not split)",
        ),
        "decode_cpu_threads": Param(
            int, 0, low=0, high=1024,
            doc="host threads of each nvImageCodec decoder, or of DALI (parsing, Huffman decoding); 0: one per core",
        ),
        "fancy_upsampling": Param(
            bool, False,
            doc="with decoder=nvimgcodec: interpolate 4:2:0/4:2:2 chroma as libjpeg-turbo and Pillow do, instead of replicating it",
        ),
        "hybrid_huffman_threshold": Param(
            int, nvimgcodec.HYBRID_HUFFMAN_THRESHOLD, low=0, high=1 << 40,
            doc="nvImageCodec's CUDA decoder Huffman-decodes images of more pixels than this on the GPU, smaller ones on "
                "host threads (DALI's key of the same name); 0: all on the GPU",
        ),
    }

    def init(self, params: dict[str, Any]) -> None:
        self.apply_exif = params["apply_exif"]
        self.max_pixels = params["max_pixels"]
        self.color = params["color"]
        self.hwc = params["data_format"] == "hwc"
        self.nvjpeg_lanes = params["decode_depth"] or nvjpeg.LANES
        self.decoder = self._pick_decoder(params["decoder"])
        self.settings = nvimgcodec.Settings(
            hw_load=params["hw_decoder_load"],
            threads=params["decode_threads"],
            cpu_threads=params["decode_cpu_threads"],
            fancy_upsampling=params["fancy_upsampling"],
            huffman_threshold=params["hybrid_huffman_threshold"],
        )
        self.dali_settings = dali_decode.Settings(
            hw_load=params["hw_decoder_load"],
            threads=min(params["decode_cpu_threads"], dali_decode.MAX_THREADS),
            chunk=params["decode_chunk"],
            depth=params["decode_depth"] or dali_decode.DEPTH,
            huffman_threshold=params["hybrid_huffman_threshold"],
        )
        self._check_decoder_keys(params)
        if self.decoder == "dali" and not dali_decode.available():
            raise ConfigError(
                "DecodeTensor(decoder=dali) needs NVIDIA DALI: pip install nvidia-dali-cuda120 (or -cuda130, for the "
                "CUDA of your torch), or choose another decoder"
            )
        self.cuda_decoder_share = params["cuda_decoder_share"]
        self.cpu_decoder_share, self.cpu_decoder_threads = params["cpu_decoder_share"], params["cpu_decoder_threads"]
        self.balance = None
        if params["cpu_decoder_balance"] and self.device.type == "cuda":
            self.balance = jpeg.ShareBalance(self.cpu_decoder_share or jpeg.BALANCE_START)
            self._shown_share = (self.balance.share, float("-inf"))  # (share last logged, when)
        if (self.decoder == "nvimgcodec" or self.cuda_decoder_share) and not nvimgcodec.available():
            wants = "decoder=nvimgcodec" if self.decoder == "nvimgcodec" else "cuda_decoder_share"
            raise ConfigError(
                f"DecodeTensor({wants}) needs nvImageCodec: pip install nvidia-nvimgcodec-cu12 "
                "(or -cu13) and nvidia-nvjpeg for the same CUDA, or leave it out"
            )

    def one_batch_at_a_time(self) -> str | None:
        """DALI's chunk pipelines and nvImageCodec's decoders are the stage's own, as is the host share's balance.
        A share on nvImageCodec's CUDA decoder may be two batches': their side decodes take turns."""
        if self.decoder in ("dali", "nvimgcodec"):
            return f"{self.name}(decoder={self.decoder}) takes one batch at a time"
        if self.balance is not None:
            return f"{self.name}'s balance of each batch's host share is one batch's at a time"
        return None

    def _pick_decoder(self, wanted: str) -> str:
        """The GPU decoder to use.  ``auto``: nvjpeg's hardware decoder driven directly where the GPU has JPEG
        engines (served on an H200 it was 1.02-1.06x torchvision's, with the lower latency at concurrency 1,
        docs/BENCHMARKS.md), else nvjpeg through torchvision; ``nvjpeg`` on a GPU without them is refused.
        A CPU instance decodes with libjpeg-turbo whatever the key says."""
        if wanted not in ("auto", "nvjpeg") or self.device.type != "cuda":
            return "torchvision" if wanted == "auto" else wanted
        why = nvjpeg.problem(self.device, self.nvjpeg_lanes)
        if why is None:
            return "nvjpeg"
        if wanted == "nvjpeg":
            raise ConfigError(f"DecodeTensor(decoder=nvjpeg): {why}; choose decoder=torchvision")
        log.info("DecodeTensor(decoder=auto) on %s: %s; nvjpeg through torchvision decodes", self.device, why)
        return "torchvision"

    def forward(self, batch: list[dict[str, Any]]) -> None:
        datas: list[torch.Tensor | None] = []
        for item in batch:
            try:
                datas.append(_bytes(item[DATA], self.name).cpu())
            except RequestError as exc:
                item[ERROR] = exc
                datas.append(None)
        todo = [(item, data) for item, data in zip(batch, datas) if data is not None]
        decode_all = functools.partial(
            jpeg.decode_jpeg_tensor, device=self.device, apply_exif=self.apply_exif, max_pixels=self.max_pixels,
            gpu_decoder=self.decoder, settings=self.settings, cuda_decoder_share=self.cuda_decoder_share,
            dali_settings=self.dali_settings, nvjpeg_lanes=self.nvjpeg_lanes,
            cpu_decoder_share=self.cpu_decoder_share, cpu_decoder_threads=self.cpu_decoder_threads, balance=self.balance,
        )
        pool = cpu_threads() if self.device.type == "cpu" and len(todo) > 1 else None
        if pool is None:
            decoded = decode_all([d for _, d in todo])
        else:  # libjpeg-turbo decodes one image per call: the instance's threads take one each
            decoded = [image for (image,) in pool.map(lambda data: decode_all([data]), [d for _, d in todo])]
        if self.balance is not None and abs(self.balance.share - self._shown_share[0]) >= 0.05 \
                and time.monotonic() - self._shown_share[1] >= SHARE_LOG_SECONDS:
            self._shown_share = (self.balance.share, time.monotonic())
            log.info("DecodeTensor on %s: cpu_decoder_balance moved the host's share to %.2f of the bytes", self.device,
                     self.balance.share)
        for (item, _), image in zip(todo, decoded):
            if isinstance(image, Exception):
                item[ERROR] = _request_error(image) if isinstance(image, DecodeError) else image
                continue
            image = color_kernels.convert_color(image, "rgb", self.color, channel_dim=0)
            item["color"] = self.color
            item[RESULT] = image.permute(1, 2, 0).contiguous() if self.hwc else image.unsqueeze(0)

    @staticmethod
    def _check_decoder_keys(params: dict[str, Any]) -> None:
        if params["decoder"] != "nvimgcodec" and params["fancy_upsampling"]:
            raise ConfigError(
                "DecodeTensor: fancy_upsampling needs decoder=nvimgcodec (torchvision's GPU decoder replicates chroma); "
                "on the CPU every decoder already interpolates it"
            )
        # auto picks nvjpeg where the GPU has JPEG engines, so nvjpeg's keys are auto's too
        tuned = {"decode_chunk": ("dali",), "decode_depth": ("dali", "nvjpeg", "auto")}
        for key, decoders in tuned.items():
            if params[key] != DecodeTensor.params[key].default and params["decoder"] not in decoders:
                users = " or ".join(f"decoder={name}" for name in decoders)
                raise ConfigError(
                    f"DecodeTensor: {key} tunes {users}, which this stage does not use; set {users} or leave it out"
                )
        on_host = params["cpu_decoder_share"] > 0 or params["cpu_decoder_balance"]
        if on_host and params["cuda_decoder_share"] > 0:
            host_key = "cpu_decoder_share" if params["cpu_decoder_share"] > 0 else "cpu_decoder_balance"
            raise ConfigError(
                f"DecodeTensor: {host_key} and cuda_decoder_share both take a share of each batch from the decoder; "
                "give one of them"
            )
        if params["cpu_decoder_threads"] != DecodeTensor.params["cpu_decoder_threads"].default and not on_host:
            raise ConfigError(
                "DecodeTensor: cpu_decoder_threads sets the threads of cpu_decoder_share; give a share above 0 "
                "(or cpu_decoder_balance = true) too, or leave it out"
            )
        uses_cuda_decoder = params["decoder"] in ("nvimgcodec", "dali") or params["cuda_decoder_share"] > 0
        if params["hybrid_huffman_threshold"] != nvimgcodec.HYBRID_HUFFMAN_THRESHOLD and not uses_cuda_decoder:
            raise ConfigError(
                "DecodeTensor: hybrid_huffman_threshold tunes the CUDA decoder of nvImageCodec or DALI, which this stage does not use; "
                "set decoder=nvimgcodec or a cuda_decoder_share above 0, or leave the key out"
            )

    @classmethod
    def infer(cls, params: dict[str, Any], spec: TensorSpec) -> TensorSpec:
        if not ENCODED_IMAGE.accepts(spec):
            raise SpecError(f"{cls.name} needs encoded bytes UINT8[?], but receives {spec.describe()}")
        cls._check_decoder_keys(params)  # before anything is written
        if params["data_format"] == "hwc":
            return TensorSpec("UINT8", (-1, -1, 3))
        return TensorSpec("UINT8", (1, 3, -1, -1), batched=True)


# --- colour -----------------------------------------------------------------------------


class _CvtColor(MapStage):
    params = {"color": _COLOR}
    channel_dim = 1

    def init(self, params: dict[str, Any]) -> None:
        self.color = params["color"]

    def check(self, data: Any) -> torch.Tensor:
        raise NotImplementedError

    def apply(self, data: Any, item: dict[str, Any]) -> Any:
        image = self.check(data)
        source = item.get("color")
        if source is None:
            raise RequestError(f"{self.name} needs to know the input's colour order; put a Decode stage before it")
        out = color_kernels.convert_color(image, source, self.color, channel_dim=self.channel_dim)
        item["color"] = self.color
        return out


@register("cvtColorTensor")
class CvtColorTensor(_CvtColor):
    """Reorders the channels of a 1x3xHxW tensor to ``color``."""

    input_doc = "1x3xHxW tensor"
    output_doc = "same shape, channels in `color` order"

    wants_gpu = True

    def check(self, data: Any) -> torch.Tensor:
        return _nchw(data, self.name)

    @classmethod
    def infer(cls, params: dict[str, Any], spec: TensorSpec) -> TensorSpec:
        _expect(cls.name, spec, rank=4, batched=True)
        return spec


@register("cvtColorMat")
class CvtColorMat(_CvtColor):
    """Reorders the channels of an HxWx3 mat to ``color``."""

    input_doc = "HxWx3 mat"
    output_doc = "same shape, channels in `color` order"

    channel_dim = 2

    def check(self, data: Any) -> torch.Tensor:
        return _hwc(data, self.name)

    @classmethod
    def infer(cls, params: dict[str, Any], spec: TensorSpec) -> TensorSpec:
        _expect(cls.name, spec, rank=3, batched=False)
        return spec


# --- resize -----------------------------------------------------------------------------

_RESIZE = {
    "resize_h": Param(int, **_SIDE, doc="output height"),
    "resize_w": Param(int, **_SIDE, doc="output width"),
}


def _resized_tensor(name: str, params: dict[str, Any], spec: TensorSpec, dtype: str | None) -> TensorSpec:
    """What a resize of a 1xCxHxW tensor produces; ``dtype`` None means FP32 from any input."""
    _expect(name, spec, rank=4, batched=True, dtype=dtype)
    return TensorSpec(dtype or "FP32", (1, spec.shape[1], params["resize_h"], params["resize_w"]), batched=True)


def _resized_mat(name: str, params: dict[str, Any], spec: TensorSpec) -> TensorSpec:
    _expect(name, spec, rank=3, batched=False, dtype="UINT8")
    return TensorSpec("UINT8", (params["resize_h"], params["resize_w"], spec.shape[2]))


class _Resize(MapStage):
    params = _RESIZE

    def init(self, params: dict[str, Any]) -> None:
        self.height, self.width = params["resize_h"], params["resize_w"]


@dataclass(frozen=True)
class PostFold:
    """What a ``ResizeTensor`` does in its one launch besides resizing, taken over from the stages after it
    in the same model (:func:`tritonpipe.stages.fold.fold_post_decode`)."""

    #: the colour order ``cvtColorTensor`` asks for; None: the channels keep their order
    color: str | None = None
    #: the model stage's per-channel normalisation, ``(x - mean) / std``
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    #: what the model's engine is fed (FP16 for the torch engine on a GPU)
    dtype: torch.dtype = torch.float32

    def describe(self) -> str:
        parts = [f"colour order {self.color}"] if self.color else []
        if self.mean is not None or self.std is not None:
            parts.append("the model's mean and std")
        return ", ".join([*parts, f"{str(self.dtype).replace('torch.', '')} output"])


@register("ResizeTensor")
class ResizeTensor(_Resize):
    """Bilinear resize of a 1x3xHxW tensor to float32 1x3x``resize_h``x``resize_w``."""

    input_doc = "1xCxHxW tensor (any dtype)"
    output_doc = "float32 1xCx`resize_h`x`resize_w`"

    wants_gpu = True
    params = {
        **_RESIZE,
        "fold_post": Param(
            bool, True,
            doc="on a GPU, where cvtColorTensor and the model stage come next in the same model, do their colour order, "
                "the model's mean and std and its input dtype in the resize's one launch (same arithmetic, fewer passes)",
        ),
    }

    def init(self, params: dict[str, Any]) -> None:
        super().init(params)
        self.fold_post = params["fold_post"]
        #: set by fold_post_decode when the model is built
        self.post: PostFold | None = None

    def apply(self, data: Any, item: dict[str, Any]) -> Any:
        image = _nchw(data, self.name).to(self.device, non_blocking=True)
        if self.post is not None:
            return self._resize_folded([image], [item])[0]
        return geometry.resize_bilinear(image, self.height, self.width)

    def forward(self, batch: list[dict[str, Any]]) -> None:
        # the whole batch is resized in one go; a bad image still fails alone
        good: list[tuple[dict[str, Any], torch.Tensor]] = []
        for item in batch:
            try:
                good.append((item, _nchw(item[DATA], self.name).to(self.device, non_blocking=True)))
            except Exception as exc:  # noqa: BLE001 - the error belongs to this request
                item[ERROR] = exc
        if not good:
            return
        try:
            resized = self._resize_all([image for _, image in good], [item for item, _ in good])
        except Exception:  # noqa: BLE001 - find the one image at fault, one by one
            super().forward([item for item, _ in good])
            return
        for (item, _), image in zip(good, resized):
            item[RESULT] = image

    def _resize_all(self, images: list[torch.Tensor], items: list[dict[str, Any]]) -> list[torch.Tensor]:
        """One kernel launch for the whole batch on a GPU, whatever its sizes; one per size elsewhere."""
        if self.post is not None:
            return self._resize_folded(images, items)
        if batch_resize.kernel_available(self.device) and len({(i.shape[1], i.dtype) for i in images}) == 1:
            return list(batch_resize.resize_batch(images, self.height, self.width).split(1))
        return geometry.resize_bilinear_many(images, self.height, self.width)

    def _resize_folded(self, images: list[torch.Tensor], items: list[dict[str, Any]]) -> list[torch.Tensor]:
        """The resize with :attr:`post`'s work in the same launch.  An item's channels are swapped where its
        colour order is known and not the one asked for; one whose order is unknown keeps it, so that
        ``cvtColorTensor`` still refuses it."""
        post = self.post
        known = [post.color is not None and item.get("color") in color_kernels.COLORS for item in items]
        swaps = [ok and item["color"] != post.color for ok, item in zip(known, items)]
        out = batch_resize.resize_batch(images, self.height, self.width, swap_rb=swaps, mean=post.mean, std=post.std,
                                        dtype=post.dtype)
        for ok, item in zip(known, items):
            if ok:
                item["color"] = post.color
        return list(out.split(1))

    @classmethod
    def infer(cls, params: dict[str, Any], spec: TensorSpec) -> TensorSpec:
        return _resized_tensor(cls.name, params, spec, None)


@register("ResizeMat")
class ResizeMat(_Resize):
    """Bilinear resize of an HxWxC uint8 mat by OpenCV (INTER_LINEAR)."""

    input_doc = "HxWxC uint8 mat"
    output_doc = "uint8 `resize_h`x`resize_w`xC"

    def apply(self, data: Any, item: dict[str, Any]) -> Any:
        return geometry.resize_bilinear_mat(_hwc(data, self.name, torch.uint8).cpu(), self.height, self.width)

    @classmethod
    def infer(cls, params: dict[str, Any], spec: TensorSpec) -> TensorSpec:
        return _resized_mat(cls.name, params, spec)


class _PillowResize(_Resize):
    params = {
        **_RESIZE,
        "pillow_version": Param(
            str, "auto", choices=("auto", *RELEASES),
            doc="the Pillow release line to match; auto: the Pillow installed where the model runs"
            f" ({NEWEST} when there is none, or a newer one)",
        ),
    }

    @staticmethod
    def _installed_release() -> str:
        try:
            import PIL
        except ImportError:
            return NEWEST
        try:
            return release_line(PIL.__version__)
        except ValueError as exc:
            raise ConfigError(
                f"pillow_version=auto: the installed {exc}; set pillow_version to one of {', '.join(RELEASES)}"
            ) from None

    def init(self, params: dict[str, Any]) -> None:
        super().init(params)
        requested = params["pillow_version"]
        self.pillow_version = self._installed_release() if requested == "auto" else requested


@register("PillowResizeTensor")
class PillowResizeTensor(_PillowResize):
    """Resize of a uint8 1x3xHxW tensor, bit-identical to Pillow's BILINEAR, on the instance's device."""

    input_doc = "1x3xHxW uint8 tensor"
    output_doc = "uint8 1x3x`resize_h`x`resize_w`"

    wants_gpu = True

    def apply(self, data: Any, item: dict[str, Any]) -> Any:
        image = _nchw(data, self.name, torch.uint8).to(self.device, non_blocking=True)
        return pillow_resize(image[0], self.height, self.width, pillow_version=self.pillow_version).unsqueeze(0)

    @classmethod
    def infer(cls, params: dict[str, Any], spec: TensorSpec) -> TensorSpec:
        return _resized_tensor(cls.name, params, spec, "UINT8")


@register("PillowResizeMat")
class PillowResizeMat(_PillowResize):
    """Resize of a uint8 HxWx3 mat, bit-identical to Pillow's BILINEAR."""

    input_doc = "HxWx3 uint8 mat"
    output_doc = "uint8 `resize_h`x`resize_w`x3"

    def apply(self, data: Any, item: dict[str, Any]) -> Any:
        image = _hwc(data, self.name, torch.uint8)
        return pillow_resize_hwc(image, self.height, self.width, pillow_version=self.pillow_version)

    @classmethod
    def infer(cls, params: dict[str, Any], spec: TensorSpec) -> TensorSpec:
        return _resized_mat(cls.name, params, spec)


@register("ResizePadTensor")
class ResizePadTensor(MapStage):
    """Aspect-preserving resize into ``max_h``x``max_w``, top-left aligned, padded with ``pad_value``.

    Also writes ``inverse_transform`` = ``[sx, sy, tx, ty]`` so that a point of the output maps
    back to the input as ``x_in = sx * x_out + tx``, ``y_in = sy * y_out + ty``.
    """

    input_doc = "1xCxHxW tensor"
    output_doc = "float32 1xCx`max_h`x`max_w`; `inverse_transform` float32 1x4"

    wants_gpu = True
    params = {
        "max_h": Param(int, **_SIDE, doc="output height"),
        "max_w": Param(int, **_SIDE, doc="output width"),
        "pad_value": Param(str, "0", doc="one number, or one per channel: 114,114,114"),
    }

    def init(self, params: dict[str, Any]) -> None:
        self.height, self.width = params["max_h"], params["max_w"]
        self.pad_value = geometry.parse_pad_value(params["pad_value"])

    def apply(self, data: Any, item: dict[str, Any]) -> Any:
        image = _nchw(data, self.name).to(self.device, non_blocking=True)
        out, inverse = geometry.resize_pad(image, self.height, self.width, self.pad_value)
        item["inverse_transform"] = inverse
        return out

    @classmethod
    def infer(cls, params: dict[str, Any], spec: TensorSpec) -> TensorSpec:
        _expect(cls.name, spec, rank=4, batched=True)
        geometry.parse_pad_value(params["pad_value"], spec.shape[1] if spec.shape[1] > 0 else 3)
        return TensorSpec("FP32", (1, spec.shape[1], params["max_h"], params["max_w"]), batched=True)

    @classmethod
    def extra_outputs(cls, params: dict[str, Any]) -> dict[str, TensorSpec]:
        return {"inverse_transform": TensorSpec("FP32", (1, 4), batched=True)}


# --- layout -----------------------------------------------------------------------------


@register("Mat2Tensor")
class Mat2Tensor(MapStage):
    """HxWxC mat -> 1xCxHxW tensor on the instance's device (same dtype)."""

    input_doc = "HxWxC mat"
    output_doc = "1xCxHxW tensor, same dtype"

    wants_gpu = True

    def apply(self, data: Any, item: dict[str, Any]) -> Any:
        return _hwc(data, self.name).to(self.device, non_blocking=True).permute(2, 0, 1).unsqueeze(0).contiguous()

    @classmethod
    def infer(cls, params: dict[str, Any], spec: TensorSpec) -> TensorSpec:
        _expect(cls.name, spec, rank=3, batched=False)
        h, w, c = spec.shape
        return TensorSpec(spec.dtype, (1, c, h, w), batched=True)


@register("Tensor2Mat")
class Tensor2Mat(MapStage):
    """1xCxHxW uint8 tensor -> HxWxC uint8 mat on the CPU."""

    input_doc = "1xCxHxW uint8 tensor"
    output_doc = "HxWxC uint8 mat (CPU)"

    def apply(self, data: Any, item: dict[str, Any]) -> Any:
        return _nchw(data, self.name, torch.uint8)[0].permute(1, 2, 0).contiguous().cpu()

    @classmethod
    def infer(cls, params: dict[str, Any], spec: TensorSpec) -> TensorSpec:
        _expect(cls.name, spec, rank=4, batched=True, dtype="UINT8")
        _, c, h, w = spec.shape
        return TensorSpec("UINT8", (h, w, c))


@register("Tensor2Vector")
class Tensor2Vector(MapStage):
    """Splits an NxCxHxW tensor into a list of its N CxHxW tensors, for stages that take one image at a time.

    A list that reaches the end of a served model is stacked back into one output tensor.
    """

    input_doc = "NxCxHxW tensor"
    output_doc = "list of N CxHxW tensors"

    def apply(self, data: Any, item: dict[str, Any]) -> Any:
        tensor = _tensor(data, self.name)
        if tensor.dim() != 4:
            raise RequestError(f"{self.name} needs an NxCxHxW tensor, got shape {tuple(tensor.shape)}")
        return list(tensor.unbind(0))

    @classmethod
    def infer(cls, params: dict[str, Any], spec: TensorSpec) -> TensorSpec:
        _expect(cls.name, spec, rank=4, batched=True)
        return spec
