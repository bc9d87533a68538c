"""The persistence layer: every file the library writes is a *bundle* written here.

A bundle is a directory entry made of safetensors tensor files and one JSON manifest.
The manifest holds the format name and version, the library version, the sha256 of
every tensor file (``files``), the bundle's **identity** (what produced it: weights,
options, data, the factors it depends on) and the format's own fields. Nothing is
pickled.

Writes are atomic as a whole (:func:`write_bundle`): the new tensor files are written
under names the current manifest does not use (temporary name, fsync, rename), then the
manifest is replaced atomically, then the files the new manifest no longer lists are
removed. A process killed at any point leaves either the previous bundle or the new
one, never new tensors with an old manifest; a file written but not yet listed is
swept by the next write (or :func:`remove_stale_files`). An ordinary error during a
write removes what it wrote; an interrupt (``KeyboardInterrupt``, ``SystemExit``) is
treated like a kill and leaves the sweep to the next write.

Reading (:func:`read_bundle`) checks the format, version and that every listed file
exists; :meth:`Bundle.tensors` checks a file's checksum before loading it; and
:meth:`Bundle.check_identity` compares the saved identity with the expected one and
raises the format's :class:`~lightning_influence.errors.StoreError` subclass naming the
keys that differ (:func:`identity_differences` gives them to callers that prefer to
recompute).

The fingerprints that identities are made of live here too: :func:`weights_fingerprint`,
:func:`factors_fingerprint`, :func:`data_fingerprint`, :func:`texts_fingerprint` and
:func:`tensors_fingerprint`. All are cheap: none reads the data more than a handful of items.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import torch
from safetensors.torch import load_file

from lightning_influence import __version__
from lightning_influence.errors import StoreError

__all__ = [
    "BundleFormat", "Bundle", "write_bundle", "read_bundle", "remove_stale_files", "new_tensor_name",
    "identity_differences", "describe_differences",
    "weights_fingerprint", "factors_fingerprint", "data_fingerprint", "texts_fingerprint", "tensors_fingerprint",
    "atomic_write_json", "sha256_file", "write_safetensors", "SafetensorsReader", "read_json_or_none",
    "ensure_writable_dir", "TensorDigest",
]

# Manifest keys the store owns; a format's own fields may not use them.
_RESERVED = ("format", "format_version", "library_version", "files", "identity")
_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*\.safetensors$")


@dataclass(frozen=True)
class BundleFormat:
    """What a kind of bundle is called, where its manifest lives and how its errors read.

    Args:
        name: the format id written to the manifest (distinct for every format).
        version: the layout version this library writes and reads.
        error: the :class:`StoreError` subclass raised for this format.
        what: what the bundle holds, for messages ("factors", "query gradients").
        make: the sentence telling how such a bundle is made (shown when it is missing).
        redo: the fix for a corrupt, outdated or mismatching one ("refit the factors").
        prefix: tensor files of this format are ``<prefix>-<12 hex>[-<role>].safetensors``.
        manifest: the manifest's file name in its directory.
        pattern: a regex of the file names this format owns (default: from ``prefix``);
            files matching it that the manifest does not list are swept after each write.
        dir_what / dir_fix: how to name the directory and its fix when it cannot be written.
    """

    name: str
    version: int
    error: type[StoreError]
    what: str
    make: str
    redo: str
    prefix: str
    manifest: str = "manifest.json"
    pattern: str | None = None
    dir_what: str = "directory"
    dir_fix: str = "choose another one"

    def owns(self, file_name: str) -> bool:
        pattern = self.pattern or rf"^{re.escape(self.prefix)}-[0-9a-f]{{12}}(-[a-z0-9]+)?\.safetensors(\.tmp)?$"
        return re.match(pattern, file_name) is not None


def new_tensor_name(fmt: BundleFormat, role: str | None = None) -> str:
    """A fresh tensor file name of ``fmt`` (unique, so it never replaces a file a manifest lists)."""
    uid = uuid.uuid4().hex[:12]
    return f"{fmt.prefix}-{uid}{'-' + role if role else ''}.safetensors"


# ------------------------------------------------------------------- writing
def write_bundle(
    fmt: BundleFormat,
    directory: str | os.PathLike,
    fields: Mapping[str, Any],
    identity: Mapping[str, Any] | None = None,
    tensors: Mapping[str, Mapping[str, torch.Tensor]] | None = None,
    keep: Iterable[str] = (),
) -> dict:
    """Write a bundle atomically and return its manifest.

    Args:
        fmt: the bundle's format.
        directory: created if needed.
        fields: the format's own JSON fields (may name tensor files).
        identity: what produced the bundle (JSON); compared by readers that reuse it.
        tensors: new tensor files by file name (see :func:`new_tensor_name`), each a dict
            of named tensors. A name the current manifest lists is refused: it would be
            replaced before the manifest is.
        keep: tensor files already listed by the current manifest that the new one lists too
            (score shards written earlier); their checksums are carried over.
    """
    directory = Path(directory)
    ensure_writable_dir(directory, fmt.error, fmt.dir_what, fmt.dir_fix)
    clash = [k for k in fields if k in _RESERVED]
    if clash:
        raise ValueError(f"bundle fields {clash} are reserved by the store")
    old = read_json_or_none(directory / fmt.manifest)
    old_files = old.get("files") if isinstance(old, dict) and old.get("format") == fmt.name else None
    old_files = old_files if isinstance(old_files, dict) else {}
    files: dict[str, str] = {}
    for name in keep:
        if name not in old_files or not (directory / name).is_file():
            raise fmt.error(f"{directory / name} is not part of the {fmt.what} in '{directory}'; {fmt.redo}")
        files[name] = old_files[name]
    tensors = dict(tensors or {})
    for name in tensors:
        if not _SAFE_NAME.match(name) or name in old_files:
            raise ValueError(f"cannot write tensor file {name!r}: not a plain new file name of this bundle")
    written: list[Path] = []
    try:
        for name, named in tensors.items():
            path = directory / name
            tmp = path.with_name(name + ".tmp")
            written += [tmp, path]
            write_safetensors(tmp, named, metadata={"format": fmt.name})
            _fsync(tmp)
            os.replace(tmp, path)
            files[name] = sha256_file(path)
        _fsync_dir(directory)  # the renamed tensor files are durable before the manifest names them
        manifest = {"format": fmt.name, "format_version": fmt.version, "library_version": __version__,
                    "files": files, "identity": _jsonable(dict(identity or {})), **fields}
        atomic_write_json(directory / fmt.manifest, manifest)
        _fsync_dir(directory)
    except Exception:
        # The manifest still lists the previous files: drop only what this write added.
        for path in written:
            try:
                path.unlink()
            except OSError:
                pass
        raise
    remove_stale_files(fmt, directory, files)
    return manifest


# safetensors' dtype names
_SAFETENSORS_DTYPES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL",
}


def write_safetensors(path: str | os.PathLike, named: Mapping[str, torch.Tensor],
                      metadata: Mapping[str, str] | None = None) -> None:
    """Write ``named`` tensors as a safetensors file, one tensor at a time.

    The header is written first, then each tensor's bytes straight from its memory (a CPU
    tensor is not copied; a GPU tensor is copied to the CPU alone), so a save never holds a
    second copy of the whole bundle, whichever safetensors version is installed, and views of
    one buffer are written as the separate tensors they are.
    """
    entries, offset = {}, 0
    for name, t in named.items():
        if t.dtype not in _SAFETENSORS_DTYPES:
            raise ValueError(f"cannot save tensor {name!r} of dtype {t.dtype} in a safetensors file")
        nbytes = t.numel() * t.element_size()
        entries[name] = {"dtype": _SAFETENSORS_DTYPES[t.dtype], "shape": list(t.shape),
                         "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    header = dict(entries)
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned, as safetensors writes it
    with open(path, "wb") as f:
        f.write(len(raw).to_bytes(8, "little"))
        f.write(raw)
        for t in named.values():
            if t.numel():
                t = t.detach().to("cpu").contiguous()
                f.write(memoryview(t.reshape(-1).view(torch.uint8).numpy()))


class SafetensorsReader:
    """One tensor at a time from a safetensors file, read with plain file reads into memory of its own.

    Unlike ``safetensors.torch.load_file`` (a memory map of the whole file, whose pages stay
    resident in this process once touched, for as long as any of its tensors lives), a tensor
    read here owns exactly its bytes, so one converted to another dtype leaves nothing behind.
    """

    _DTYPES = {code: dtype for dtype, code in _SAFETENSORS_DTYPES.items()}

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        with open(self.path, "rb") as f:
            size = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(size))
        self._start = 8 + size
        header.pop("__metadata__", None)
        self.entries: dict[str, dict] = header

    def keys(self) -> list[str]:
        return list(self.entries)

    def read(self, name: str) -> torch.Tensor:
        entry = self.entries[name]
        dtype = self._DTYPES[entry["dtype"]]
        begin, end = entry["data_offsets"]
        data = bytearray(end - begin)
        with open(self.path, "rb") as f:
            f.seek(self._start + begin)
            if f.readinto(data) != len(data):
                raise ValueError(f"{self.path} ends inside tensor {name!r}")
        if not data:
            return torch.empty(entry["shape"], dtype=dtype)
        return torch.frombuffer(data, dtype=dtype).reshape(entry["shape"])


def remove_stale_files(fmt: BundleFormat, directory: str | os.PathLike, keep: Iterable[str]) -> None:
    """Remove ``fmt``'s files in ``directory`` (and their temporaries) that are not in ``keep``."""
    keep = set(keep)
    try:
        entries = list(Path(directory).iterdir())
    except OSError:
        return
    for path in entries:
        if fmt.owns(path.name) and path.name not in keep:
            try:
                path.unlink()
            except OSError:
                pass


# ------------------------------------------------------------------- reading
class Bundle:
    """A bundle read from disk: its manifest, checked for format, version and file list."""

    def __init__(self, fmt: BundleFormat, directory: Path, manifest: dict):
        self.format = fmt
        self.directory = directory
        self.manifest = manifest

    @property
    def manifest_path(self) -> Path:
        return self.directory / self.format.manifest

    @property
    def identity(self) -> dict:
        return self.manifest["identity"]

    @property
    def files(self) -> dict[str, str]:
        """Tensor file name -> sha256, for every file of the bundle."""
        return self.manifest["files"]

    def require_file(self, name: Any) -> Path:
        """The path of a tensor file the format's fields name; it must be one the manifest lists."""
        if not isinstance(name, str) or name not in self.files:
            raise self.format.error(f"{self.manifest_path} is corrupt (it names tensor file {name!r}, which is not "
                                    f"among its files); {self.format.redo}")
        return self.directory / name

    def _checked(self, name: str) -> Path:
        path = self.require_file(name)
        if not path.is_file():
            raise self.format.error(f"{path} named by {self.manifest_path} is missing; {self.format.redo}")
        if sha256_file(path) != self.files[name]:
            raise self.format.error(f"{path} does not match its checksum (truncated or corrupt); {self.format.redo}")
        return path

    def tensors(self, name: str, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
        """Load one tensor file of the bundle after checking its checksum."""
        path = self._checked(name)
        try:
            return load_file(str(path), device=str(device))
        except Exception as err:  # safetensors raises its own error types
            raise self.format.error(f"{path} could not be read ({err}); {self.format.redo}") from None

    def reader(self, name: str) -> SafetensorsReader:
        """A tensor-at-a-time reader of one tensor file of the bundle, after checking its checksum."""
        path = self._checked(name)
        try:
            return SafetensorsReader(path)
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise self.format.error(f"{path} could not be read ({err}); {self.format.redo}") from None

    def differences(self, expected: Mapping[str, Any]) -> dict[str, tuple[Any, Any]]:
        """``{key: (saved, expected)}`` for every identity entry that differs (dotted keys)."""
        return identity_differences(self.identity, expected)

    def check_identity(self, expected: Mapping[str, Any], what_differs: str | None = None) -> None:
        """Raise the format's error, naming the differing keys, unless the identity equals ``expected``."""
        diffs = self.differences(expected)
        if diffs:
            raise self.format.error(
                f"the {self.format.what} in '{self.directory}' {what_differs or 'come from another run'} "
                f"({describe_differences(diffs)}); {self.format.redo}",
                differences=diffs,
            )


def read_bundle(fmt: BundleFormat, directory: str | os.PathLike) -> Bundle:
    """Read a bundle's manifest, checking format, version, the file list and that every file exists.

    Each failure raises ``fmt.error`` naming the file and the fix.
    """
    directory = Path(directory)
    path = directory / fmt.manifest
    if not path.is_file():
        raise fmt.error(f"no {fmt.what} at '{directory}': {path} does not exist. {fmt.make}")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as err:
        raise fmt.error(f"{path} is corrupt ({err}); {fmt.redo}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != fmt.name:
        raise fmt.error(f"{path} is not a lightning-influence {fmt.what} manifest; point to the directory they were "
                        f"saved to, or {fmt.redo}")
    if manifest.get("format_version") != fmt.version:
        raise fmt.error(f"{path} has format version {manifest.get('format_version')}, this library reads version "
                        f"{fmt.version} (written by lightning-influence {manifest.get('library_version')}); "
                        f"{fmt.redo} with this version")
    files, identity = manifest.get("files"), manifest.get("identity")
    if (not isinstance(files, dict) or not isinstance(identity, dict)
            or not all(isinstance(k, str) and _SAFE_NAME.match(k) and isinstance(v, str) for k, v in files.items())):
        raise fmt.error(f"{path} is corrupt (invalid 'files' or 'identity' entries); {fmt.redo}")
    for name in files:
        if not (directory / name).is_file():
            raise fmt.error(f"{directory / name} named by {path} is missing; {fmt.redo}")
    return Bundle(fmt, directory, manifest)


# ------------------------------------------------------------------ identity
def identity_differences(saved: Mapping[str, Any] | None, expected: Mapping[str, Any]) -> dict[str, tuple[Any, Any]]:
    """The entries of two identities that differ, as ``{dotted key: (saved, expected)}``.

    Nested dicts compare entry by entry (``"data.length"``); a key present on one side only
    differs (its other side is ``None``). Values compare after a JSON round trip, so a tuple
    equals the list it is saved as.
    """
    a, b = _flatten(_jsonable(dict(saved or {}))), _flatten(_jsonable(dict(expected)))
    return {k: (a.get(k), b.get(k)) for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)}


def describe_differences(diffs: Mapping[str, tuple[Any, Any]], limit: int = 6) -> str:
    """``"max_examples: 8 saved, None now; ..."`` for log lines and errors."""
    parts = [f"{k}: {_short(s)} saved, {_short(e)} now" for k, (s, e) in list(diffs.items())[:limit]]
    if len(diffs) > limit:
        parts.append(f"and {len(diffs) - limit} more")
    return "; ".join(parts)


def _short(value: Any) -> str:
    text = json.dumps(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def _jsonable(value: Any) -> Any:
    try:
        return json.loads(json.dumps(value, sort_keys=True))
    except (TypeError, ValueError) as err:
        raise ValueError(f"a bundle identity must be JSON-serialisable ({err})") from None


# --------------------------------------------------------------- fingerprints
def tensors_fingerprint(named: Iterable[tuple[str, torch.Tensor]], head: Any = None) -> str:
    """sha256 over ``head`` (JSON) and the name, dtype, shape and bytes of every tensor, in order."""
    h = hashlib.sha256(json.dumps(head, sort_keys=True).encode())
    for name, t in named:
        _hash_tensor(h, name, t)
    return h.hexdigest()


def _hash_tensor(h: "hashlib._Hash", name: str, t: torch.Tensor) -> None:
    t = t.detach().to("cpu").contiguous()
    h.update(f"|{name}:{t.dtype}:{tuple(t.shape)}|".encode())
    h.update(_tensor_bytes(t))


class TensorDigest:
    """The sha256 of named tensors (name, dtype, shape, bytes), fed one tensor at a time."""

    def __init__(self):
        self._h = hashlib.sha256()

    def add(self, name: str, t: torch.Tensor) -> None:
        _hash_tensor(self._h, name, t)

    def hexdigest(self) -> str:
        return self._h.hexdigest()


def factors_fingerprint(factors: Any) -> str:
    """A sha256 over everything that decides how factors precondition a gradient.

    Covers the strategy, fisher type, phase, the damping actually used per layer, the layer
    shapes and the bytes of every statistic tensor as fitted, so that two factor objects share a
    fingerprint exactly when they precondition identically (a saved-then-loaded copy does, loaded
    in the scoring dtype too; the same statistics with another damping do not). It reads every
    tensor once (about the size of the factors' file), except where the factors already know the
    digest of the tensors they hold (:meth:`InfluenceFactors.tensor_digest`).
    """
    head = {
        "strategy": factors.strategy,
        "fisher": factors.fisher,
        "phase": factors.phase,
        "layers": {n: [l.kind, l.d_out, l.d_in, l.has_bias] for n, l in factors.layers.items()},
        "damping": ({n: float(factors.damping_for(n)).hex() for n in factors.layers}
                    if factors.is_complete else None),
    }
    h = hashlib.sha256(json.dumps(head, sort_keys=True).encode())
    h.update(factors.tensor_digest().encode())
    return h.hexdigest()


def weights_fingerprint(model: torch.nn.Module, names: Iterable[str] | None = None) -> str:
    """A cheap fingerprint of a model's weights: per parameter its shape, float64 sum, sum of
    squares and 64 evenly strided values.

    ``names`` restricts it to those submodules' own parameters (default: every parameter of
    the model, since untracked layers shape the tracked layers' inputs and gradients). The
    sums depend on the reduction order, so the same weights on another device type may
    fingerprint differently (a resume there refits: never a wrong reuse).
    """
    if names is None:
        params = list(model.named_parameters())
    else:
        params = [(f"{n}.{p}", t) for n in names for p, t in model.get_submodule(n).named_parameters(recurse=False)]
    h = hashlib.sha256()
    with torch.no_grad():
        for pname, p in params:
            flat = p.detach().reshape(-1)
            total = float(flat.sum(dtype=torch.float64)) if flat.numel() else 0.0
            square = float(torch.linalg.vector_norm(flat, dtype=torch.float64) ** 2) if flat.numel() else 0.0
            sample = flat[:: max(1, flat.numel() // 64)].double().tolist()
            h.update(f"{pname}:{tuple(p.shape)}:{total:.12e}:{square:.12e}:{sample}".encode())
    return h.hexdigest()[:16]


def texts_fingerprint(texts: Sequence[str]) -> str:
    """sha256 of texts in order (lengths included, so boundaries count)."""
    h = hashlib.sha256()
    for t in texts:
        b = t.encode("utf-8")
        h.update(len(b).to_bytes(8, "little"))
        h.update(b)
    return h.hexdigest()


def data_fingerprint(data: Any, num_items: int = 8) -> dict[str, Any]:
    """What can be known cheaply about the data a pass iterates, as a JSON dict.

    For a ``DataLoader``: its batch size and ``drop_last``, and of its dataset the type, the
    length and a hash of ``num_items`` evenly spaced items (first and last included). A
    plain sized, indexable iterable (a list of batches) is hashed the same way, item by item.
    An ``IterableDataset`` or an unsized iterable cannot be read without consuming it: only
    its type (and length when it has one) is recorded, so a change of its contents goes
    unnoticed; pass a map-style dataset where resuming must be safe. Never a full pass.
    """
    from torch.utils.data import DataLoader, IterableDataset

    out: dict[str, Any] = {"type": type(data).__name__}
    source = data
    if isinstance(data, DataLoader):
        out.update(batch_size=data.batch_size, drop_last=data.drop_last, dataset=type(data.dataset).__name__)
        source = data.dataset
    try:
        n = len(source)
    except TypeError:
        n = None
    out["length"] = n
    if n is None or isinstance(source, IterableDataset) or not hasattr(source, "__getitem__"):
        out["items_sha256"] = None  # contents unknowable without iterating
        return out
    picks = sorted({round(i * (n - 1) / max(1, num_items - 1)) for i in range(min(num_items, n))})
    h = hashlib.sha256()
    try:
        for i in picks:
            h.update(f"#{i}".encode())
            _hash_item(h, source[i])
    except Exception as err:  # a dataset whose items cannot be read by index
        out["items_sha256"] = f"unreadable: {type(err).__name__}"
        return out
    out["items_sha256"] = h.hexdigest()[:16]
    return out


def _hash_item(h: "hashlib._Hash", item: Any) -> None:
    import numpy as np

    if isinstance(item, torch.Tensor):
        t = item.detach().to("cpu").contiguous()
        h.update(f"T{t.dtype}{tuple(t.shape)}".encode())
        h.update(_tensor_bytes(t))
    elif isinstance(item, np.ndarray):
        h.update(f"N{item.dtype}{item.shape}".encode())
        h.update(np.ascontiguousarray(item).tobytes())
    elif isinstance(item, Mapping):
        for k in sorted(item, key=str):
            h.update(f"K{k}".encode())
            _hash_item(h, item[k])
    elif isinstance(item, (list, tuple)):
        h.update(f"L{len(item)}".encode())
        for v in item:
            _hash_item(h, v)
    elif isinstance(item, (str, int, float, bool, type(None))):
        h.update(f"V{item!r}".encode())
    else:  # other objects: their type only (a repr may hold a memory address)
        h.update(f"O{type(item).__qualname__}".encode())


def _tensor_bytes(t: torch.Tensor) -> bytes:
    if t.numel() == 0:
        return b""
    # view as bytes without going through numpy's dtypes (bf16 has none)
    return t.reshape(-1).view(torch.uint8).numpy().tobytes()


# ------------------------------------------------------------- file helpers
def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _fsync(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _fsync_dir(directory: Path) -> None:
    """Make renames in ``directory`` durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def read_json_or_none(path: Path) -> Any:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return None


def atomic_write_json(path: Path, payload: dict) -> None:
    """Write JSON to a temporary file in the same directory, fsync it, then rename it into place."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(payload, f, indent=2, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def ensure_writable_dir(directory: Path, error: type[Exception], what: str = "directory",
                        fix: str = "choose another one") -> None:
    """Create ``directory`` if needed; raise ``error`` naming the fix when it cannot be written."""
    directory = Path(directory)
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise error(f"cannot create {what} '{directory}' ({err.strerror}); {fix}") from None
    if not os.access(directory, os.W_OK):
        raise error(f"{what} '{directory}' is not writable; {fix}")
