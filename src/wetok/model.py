"""WeTok: encoder -> group-wise quantizer -> tokens -> (generative) decoder."""

from __future__ import annotations

import copy
import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .autoencoder import Decoder, Encoder, draw_noise
from .config import WeTokConfig
from .quantizer import GroupQuantizer, QuantizerOutput, indices_to_codes
from .tokens import Tokens, check_model

__all__ = ["Tokens", "WeTok", "WeTokOutput", "weights_identity"]


@dataclass
class WeTokOutput:
    """The training forward pass: ``reconstruction`` (B, 3, H, W), not clamped, and the quantizer's output."""

    reconstruction: Tensor
    quantizer: QuantizerOutput


def _at_least_float32(x: Tensor) -> Tensor:
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


class WeTok(nn.Module):
    """A WeTok tokenizer built from a :class:`WeTokConfig`.

    Images are float (B, 3, H, W) in [-1, 1] with H and W multiples of the downsampling factor f
    (:mod:`wetok.image` pads arbitrary sizes).
    """

    def __init__(self, config: WeTokConfig) -> None:
        super().__init__()
        self.config = config
        arch = dict(
            channels=config.channels,
            ch_mult=config.ch_mult,
            num_res_blocks=config.num_res_blocks,
            z_channels=config.z_channels,
            norm_groups=config.norm_groups,
        )
        self.encoder = Encoder(**arch)
        self.quantizer = GroupQuantizer(
            groups=config.groups,
            bits_per_group=config.bits_per_group,
            temperature=config.temperature,
            token_weight=config.token_weight,
            codebook_weight=config.codebook_weight,
            commitment_weight=config.commitment_weight,
            entropy_weight=config.entropy_weight,
            codebook_form=config.codebook_form,
            token_reduction=config.token_reduction,
        )
        self.decoder = Decoder(**arch, generative=config.generative_decoder)
        self.name_or_path: str | None = None  # the name or path it was loaded from, recorded in its tokens
        self._weights_id: str | None = None

    # ----------------------------------------------------------------------------------------------- construction
    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> WeTok:
        """A **randomly initialised** model with a registered configuration (:func:`wetok.list_models`), with
        optional field overrides. For the trained weights of a name use :meth:`from_pretrained`."""
        from .registry import model_entry

        entry = model_entry(name, "tokenizer")
        return cls(entry.config.replace(**overrides) if overrides else entry.config)

    @classmethod
    def from_pretrained(cls, name_or_path: str | Path, **kwargs: Any) -> WeTok:
        """The trained model of a native folder (``config.json`` + ``model.safetensors``), a registered name
        (its bundled or published weights, downloaded and cached; see :func:`wetok.list_models`) or a Hugging Face
        Hub repo id. Keyword arguments: ``device``, ``dtype``, ``revision``, ``cache_dir``, ``local_files_only``,
        ``progress`` (see :func:`wetok.checkpoints.load_pretrained`)."""
        from .checkpoints import load_pretrained

        return load_pretrained(name_or_path, **kwargs)

    @classmethod
    def from_official(cls, ckpt: str | Path, config: str | Path | WeTokConfig, **kwargs: Any) -> WeTok:
        """Load an official Lightning ``.ckpt`` with its YAML config (or a preset name); EMA weights by default.

        :func:`wetok.official.load_official_with_report` also says where each tensor came from.
        """
        from .official import load_official

        return load_official(ckpt, config, **kwargs)

    def save_pretrained(self, directory: str | Path) -> Path:
        """Write ``config.json`` and ``model.safetensors`` into ``directory``."""
        from .checkpoints import save_pretrained

        return save_pretrained(self, directory)

    def to_generative(self) -> WeTok:
        """A copy with the generative decoder: conv_in zero-extended to take noise (stage-2 initialisation).

        The noise channels' weights are zero, so the copy decodes exactly like this model for any noise.
        """
        if self.config.generative_decoder:
            raise ValueError("the model already has a generative decoder")
        new = WeTok(self.config.replace(generative_decoder=True)).to(
            device=self.decoder.conv_in.weight.device, dtype=self.decoder.conv_in.weight.dtype
        )
        state = {k: v.clone() for k, v in self.state_dict().items()}
        weight = state["decoder.conv_in.weight"]
        state["decoder.conv_in.weight"] = torch.cat([weight, torch.zeros_like(weight)], dim=1)
        new.load_state_dict(state)
        new.train(self.training)
        new.name_or_path = self.name_or_path
        new._weights_id = self.weights_id  # the same encoder and quantizer: it decodes this model's tokens
        return new

    # ------------------------------------------------------------------------------------------------ properties
    @property
    def downsample_factor(self) -> int:
        return self.config.downsample_factor

    @property
    def model_id(self) -> str:
        """The architecture identity (:meth:`WeTokConfig.identity`), recorded in tokens."""
        return self.config.identity()

    @property
    def weights_id(self) -> str:
        """16 hex digits identifying the encoder and quantizer weights, recorded in tokens beside :attr:`model_id`.

        Computed once (by :meth:`load_state_dict`, else on first use or before the first dtype / device
        conversion) and cached, so a float32 model converted to bfloat16 keeps the identity of its float32
        weights. :meth:`train` clears the cache (training changes the weights); weights changed in place outside
        training need :meth:`refresh_weights_id`.
        """
        if self._weights_id is None:
            self._weights_id = weights_identity(self)
        return self._weights_id

    def refresh_weights_id(self) -> str:
        """Recompute :attr:`weights_id` from the current weights."""
        self._weights_id = None
        return self.weights_id

    def load_state_dict(self, state_dict: Any, strict: bool = True, assign: bool = False) -> Any:
        result = super().load_state_dict(state_dict, strict=strict, assign=assign)
        self._weights_id = None if next(self.parameters()).is_meta else weights_identity(self)
        return result

    def train(self, mode: bool = True) -> WeTok:
        if mode:
            self._weights_id = None
        return super().train(mode)

    def _apply(self, fn: Any, recurse: bool = True) -> WeTok:
        # .to() / .half() / .cuda() ...: fix the identity on the weights as they are before the conversion
        if self._weights_id is None and not next(self.parameters()).is_meta:
            self._weights_id = weights_identity(self)
        return super()._apply(fn, recurse)

    def num_parameters(self) -> dict[str, int]:
        count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
        return {"encoder": count(self.encoder), "decoder": count(self.decoder), "total": count(self)}

    # ----------------------------------------------------------------------------------------------- inference
    def _check_images(self, images: Tensor) -> None:
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"expected images of shape (B, 3, H, W), got {tuple(images.shape)}")
        f = self.downsample_factor
        if images.shape[-2] % f or images.shape[-1] % f:
            raise ValueError(
                f"image size {tuple(images.shape[-2:])} is not a multiple of the downsampling factor {f}; "
                "pad with wetok.image.pad_to_multiple"
            )

    def encode_latent(self, images: Tensor) -> Tensor:
        """Continuous encoder output (B, z_channels, H/f, W/f), before quantization.

        The images are cast to the encoder's dtype; a bfloat16 / float16 latent is returned as float32, so the
        quantizer always works in at least float32.
        """
        self._check_images(images)
        return _at_least_float32(self.encoder(images.to(self.encoder.conv_in.weight.dtype)))

    def encode(self, images: Tensor) -> Tokens:
        """Images (B, 3, H, W) in [-1, 1] -> :class:`Tokens`."""
        latent = self.encode_latent(images)
        indices = self.quantizer(latent).indices
        return Tokens(
            indices,
            (int(images.shape[-2]), int(images.shape[-1])),
            model_id=self.model_id,
            weights_id=self.weights_id,
            bits_per_group=self.config.bits_per_group,
            model=self.name_or_path,
        )

    def make_noise(self, codes: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Standard Gaussian noise shaped like the quantized latent, drawn from ``generator`` if given."""
        return draw_noise(codes.shape, generator, codes.device).to(device=codes.device, dtype=codes.dtype)

    def decode_codes(
        self,
        codes: Tensor,
        *,
        noise: Tensor | None = None,
        generator: torch.Generator | None = None,
        noise_scale: float = 1.0,
    ) -> Tensor:
        """Quantized latent (B, d, h, w) of +1/-1 -> images (B, 3, h*f, w*f), not clamped.

        The codes are cast to the decoder's dtype; a bfloat16 / float16 decoder's images are returned as float32
        (and contiguous, whatever memory format the decoder ran in).
        """
        codes = codes.to(self.decoder.conv_in.weight.dtype)
        if not self.config.generative_decoder:
            if noise is not None:
                raise ValueError("this model has a deterministic decoder; it takes no noise")
            return _at_least_float32(self.decoder(codes)).contiguous()
        if noise is None:
            noise = self.make_noise(codes, generator)
        return _at_least_float32(self.decoder(codes, noise * noise_scale)).contiguous()

    def decode(
        self,
        tokens: Tokens | Tensor,
        *,
        noise: Tensor | None = None,
        generator: torch.Generator | None = None,
        noise_scale: float = 1.0,
    ) -> Tensor:
        """Tokens, or indices (B, h, w, g), -> images (B, 3, H, W), not clamped.

        :class:`Tokens` made by another model (another architecture, or other encoder weights) are refused with
        :class:`wetok.ModelMismatchError`; bare indices are not checked. With the generative decoder the noise is ``noise`` if given (shape (B, d, h, w)), else drawn from
        ``generator`` (a fixed seed reproduces the output); it is multiplied by ``noise_scale``, so
        ``noise_scale=0`` decodes deterministically.
        """
        if isinstance(tokens, Tokens):
            check_model("tokens", tokens, self)
            indices = tokens.indices
        else:
            indices = tokens
        if indices.dim() != 4 or indices.shape[-1] != self.config.groups:
            raise ValueError(f"expected indices (B, h, w, {self.config.groups}), got {tuple(indices.shape)}")
        dtype = self.decoder.conv_in.weight.dtype
        codes = indices_to_codes(indices.to(self.decoder.conv_in.weight.device), self.config.bits_per_group, dtype)
        return self.decode_codes(codes, noise=noise, generator=generator, noise_scale=noise_scale)

    def reconstruct(
        self,
        images: Tensor,
        *,
        noise: Tensor | None = None,
        generator: torch.Generator | None = None,
        noise_scale: float = 1.0,
    ) -> Tensor:
        """Encode, quantize and decode (B, 3, H, W) images; the result is not clamped."""
        latent = self.encode_latent(images)
        codes = self.quantizer(latent).quantized
        return self.decode_codes(codes, noise=noise, generator=generator, noise_scale=noise_scale)

    def forward(self, images: Tensor, *, generator: torch.Generator | None = None) -> WeTokOutput:
        """Training forward pass: reconstruction plus the quantizer's loss terms."""
        latent = self.encode_latent(images)
        q = self.quantizer(latent)
        reconstruction = self.decode_codes(q.quantized, generator=generator)
        return WeTokOutput(reconstruction=reconstruction, quantizer=q)

    def copy(self) -> WeTok:
        return copy.deepcopy(self)


def weights_identity(model: WeTok) -> str:
    """16 hex digits of the SHA-256 of the encoder and quantizer state (names, shapes and float32 values).

    Values are hashed as float32, so the identity of a float32 model does not depend on its memory format.
    """
    digest = hashlib.sha256()
    state = {**{f"encoder.{k}": v for k, v in model.encoder.state_dict().items()},
             **{f"quantizer.{k}": v for k, v in model.quantizer.state_dict().items()}}
    for key in sorted(state):
        value = state[key].detach()
        value = value.to("cpu", torch.float32 if value.is_floating_point() else torch.int64).contiguous()
        digest.update(f"{key}:{tuple(value.shape)}:".encode())
        digest.update(value.numpy().tobytes())
    return digest.hexdigest()[:16]
