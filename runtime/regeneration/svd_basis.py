"""SVD bases of base weights, computed once per machine and cached on disk (docs/methods.md, regeneration).

``W0 = U diag(σ) Vᵀ`` is computed on the CPU in float64 by LAPACK (``torch.linalg.svd``, thin),
then the canonical sign is applied: for every singular pair the entry of largest magnitude in the
column of U is made positive and V's column flips with it. SVD is not bit-identical across
machines or thread counts, so the contract is on ΔW (relative Frobenius error ≤ 1e-5), checked
by the adapter format's probe, not on the bits of U and V.

The cache holds one safetensors file per layer, named by the layer fingerprint (a hash of the
weight bytes, :mod:`svda.runtime.fingerprint`), so a base's SVD runs once per machine and layers
shared by two bases are computed once. A cached file is used only if its metadata names the same
fingerprint, shape and algorithm and a random probe reproduces ``W0 p``; otherwise (truncated,
corrupted, or another weight's file under the name) it is recomputed and rewritten. Each file
also records the SHA-256 of its tensors (computed when written), the basis' bit-level identity:
adapter files carry the identity of the bases they were exported with, so a loader whose bases
are bit-identical can skip the regeneration probe (see ``svda.adapters_store.loader``).
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ..fingerprint import layer_fingerprint
from ..paths import svda_home

log = logging.getLogger(__name__)

SVD_ALGORITHM = "torch.linalg.svd/cpu/float64/thin/canonical-sign-max-abs-u/v1"
PROBE_TOLERANCE = 1e-4
HEX64 = re.compile(r"[0-9a-f]{64}")


@dataclass
class SvdBasis:
    """Thin SVD of a ``(d1, d2)`` weight: U (d1, m), sigma (m,) descending, V (d2, m)."""

    U: torch.Tensor
    sigma: torch.Tensor
    V: torch.Tensor
    identity: str = ""  # SHA-256 of the tensors' bytes as cached ("" until known)

    def to(self, dtype: torch.dtype, device: torch.device | str | None = None) -> SvdBasis:
        return SvdBasis(*(t.to(dtype=dtype, device=device) for t in (self.U, self.sigma, self.V)))

    def content_sha256(self) -> str:
        """SHA-256 of U, sigma, V (dtype, shape and bytes), the basis' bit-level identity."""
        h = hashlib.sha256()
        for t in (self.U, self.sigma, self.V):
            t = t.detach().cpu().contiguous()
            h.update(f"{t.dtype}{tuple(t.shape)}".encode())
            h.update(t.view(torch.uint8).numpy().tobytes())
        return h.hexdigest()

    def reconstruct(self) -> torch.Tensor:
        return (self.U * self.sigma) @ self.V.T


def canonicalize_signs(u: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Flip each singular pair so the largest-magnitude entry of U's column is positive."""
    rows = u.abs().argmax(dim=0)  # (m,)
    signs = torch.sign(u[rows, torch.arange(u.shape[1])])
    signs[signs == 0] = 1
    return u * signs, v * signs


def compute_svd_basis(weight_oi: torch.Tensor, dtype: torch.dtype = torch.float64) -> SvdBasis:
    """Thin SVD with the canonical sign, computed on the CPU in ``dtype`` (float64 by contract;
    float32 only for tests that measure the difference). Result stays in ``dtype``."""
    w = weight_oi.detach().to(device="cpu", dtype=dtype)
    u, sigma, vh = torch.linalg.svd(w, full_matrices=False)
    u, v = canonicalize_signs(u, vh.T)
    return SvdBasis(u.contiguous(), sigma.contiguous(), v.contiguous())


class SvdBasisCache:
    """On-disk cache of SVD bases under ``root`` (default ``$SVDA_HOME/svd``)."""

    def __init__(self, root: str | os.PathLike | None = None, dtype: torch.dtype = torch.float32):
        self.root = Path(root) if root is not None else svda_home() / "svd"
        self.dtype = dtype  # stored dtype; the SVD itself always runs in float64
        self.hits = 0
        self.misses = 0

    def path_for(self, fingerprint: str) -> Path:
        return self.root / f"{fingerprint}.safetensors"

    def get(self, weight_oi: torch.Tensor, fingerprint: str | None = None) -> SvdBasis:
        """The basis of ``weight_oi`` (CPU, cache dtype): from the cache if valid, else computed
        in float64 and stored."""
        fingerprint = fingerprint or layer_fingerprint(weight_oi)
        cached = self._load_valid(weight_oi, fingerprint)
        if cached is not None:
            self.hits += 1
            return cached
        self.misses += 1
        basis = compute_svd_basis(weight_oi).to(self.dtype)
        basis.identity = basis.content_sha256()
        self._store(basis, fingerprint, tuple(weight_oi.shape))
        return basis

    def _load_valid(self, weight_oi: torch.Tensor, fingerprint: str) -> SvdBasis | None:
        path = self.path_for(fingerprint)
        if not path.exists():
            return None
        reason = None
        try:
            tensors, meta = _read(path)
            basis = SvdBasis(tensors["U"], tensors["sigma"], tensors["V"], meta.get("sha256", ""))
            reason = _validation_error(basis, meta, weight_oi, fingerprint, self.dtype)
            if reason is None and not HEX64.fullmatch(basis.identity):
                reason = "metadata has no content hash"
        except (SafetensorError, OSError, KeyError, ValueError, RuntimeError) as exc:
            reason = f"unreadable ({exc})"
        if reason is None:
            return basis
        log.warning("SVD cache file %s ignored and recomputed: %s", path, reason)
        return None

    def _store(self, basis: SvdBasis, fingerprint: str, shape: tuple[int, int]) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        meta = {
            "fingerprint": fingerprint,
            "shape": f"{shape[0]}x{shape[1]}",
            "algorithm": SVD_ALGORITHM,
            "sha256": basis.identity,
        }
        tensors = {"U": basis.U.contiguous(), "sigma": basis.sigma, "V": basis.V.contiguous()}
        fd, tmp = tempfile.mkstemp(dir=self.root, suffix=".tmp")
        os.close(fd)
        try:
            save_file(tensors, tmp, metadata=meta)
            with open(tmp, "rb") as fh:
                os.fsync(fh.fileno())
            os.replace(tmp, self.path_for(fingerprint))
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)


def _read(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as fh:
        meta = fh.metadata() or {}
    return load_file(str(path)), meta


def _validation_error(
    basis: SvdBasis,
    meta: dict[str, str],
    weight_oi: torch.Tensor,
    fingerprint: str,
    dtype: torch.dtype,
) -> str | None:
    """Why a cached basis must not be used, or None if it is good."""
    d1, d2 = weight_oi.shape
    m = min(d1, d2)
    if meta.get("fingerprint") != fingerprint or meta.get("algorithm") != SVD_ALGORITHM:
        return "metadata names other weights or another algorithm"
    if (basis.U.shape, basis.sigma.shape, basis.V.shape) != ((d1, m), (m,), (d2, m)):
        return "tensor shapes do not match the weight"
    if basis.U.dtype != dtype:
        return f"stored as {basis.U.dtype}, cache expects {dtype}"
    return _probe_error(basis, weight_oi)


def _probe_error(basis: SvdBasis, weight_oi: torch.Tensor) -> str | None:
    """Check ``U diag(σ) Vᵀ p ≈ W0 p`` for two fixed random probes (cheap: matrix-vector only)."""
    b = basis
    w = weight_oi.detach().to(device="cpu", dtype=b.U.dtype)
    generator = torch.Generator().manual_seed(0)
    probes = torch.randn(w.shape[1], 2, generator=generator).to(b.U.dtype)
    expected = w @ probes
    got = b.U @ (b.sigma[:, None] * (b.V.T @ probes))
    error = (
        torch.linalg.norm(got - expected) / torch.linalg.norm(expected).clamp_min(1e-30)
    ).item()
    if not error <= PROBE_TOLERANCE:
        return f"does not reproduce the weight (relative probe error {error:.2e})"
    return None
