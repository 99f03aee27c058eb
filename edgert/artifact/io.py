"""Reading and writing artifact directories: atomic writes, hash verification."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from edgert.artifact.graph_signature import GraphSignature, MalformedGraph, read_signature
from edgert.artifact.manifest import (
    MANIFEST_NAME,
    GraphKey,
    GraphSpec,
    Manifest,
    quote,
    sha256_file,
)
from edgert.errors import ArtifactError, ConfigError, EdgertError


def _owner_gone(pid: int, since: float) -> bool:
    """Whether process ``pid`` (which made a directory last modified at ``since``) is gone:
    no such process, or one started after that directory (the pid was reused)."""
    import psutil

    try:
        return psutil.Process(pid).create_time() > since + 1.0
    except (psutil.NoSuchProcess, psutil.ZombieProcess):
        return True
    except psutil.Error:  # no access: assume it is alive
        return False


def remove_stale_temporaries(target: Path) -> list[Path]:
    """Remove ``.<name>.tmp-<pid>-*`` and ``.<name>.old-<pid>`` directories next to ``target``
    that a killed write left (their process is gone); returns what was removed. Others' files
    and live writers' directories are left alone."""
    target = Path(target).resolve()
    removed = []
    try:
        siblings = list(target.parent.iterdir())
    except OSError:
        return removed
    for entry in siblings:
        for kind in ("tmp", "old"):
            prefix = f".{target.name}.{kind}-"
            if not (entry.name.startswith(prefix) and entry.is_dir()):
                continue
            pid = entry.name[len(prefix):].split("-", 1)[0]
            try:
                gone = pid.isdigit() and _owner_gone(int(pid), entry.stat().st_mtime)
            except OSError:
                continue
            if gone:
                shutil.rmtree(entry, ignore_errors=True)
                removed.append(entry)
    return removed


@contextmanager
def atomic_directory(target: Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary directory next to ``target``; rename it to ``target`` on success.

    On any error the temporary directory is removed; a kill leaves it as
    ``.<name>.tmp-<pid>-*``, which never loads (``target`` either does not exist or is a
    complete artifact) and which the next write of ``target`` (or a load) removes once its
    process is gone.
    """
    target = target.resolve()
    if target.exists() and not overwrite:
        raise EdgertError(f"{target} already exists; pass --force to replace it or choose "
                          "another output directory")
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(target)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-{os.getpid()}-",
                                dir=target.parent))
    try:
        yield tmp
        tmp.chmod(0o755)  # mkdtemp made it 0700
        for entry in tmp.iterdir():
            entry.chmod(0o755 if entry.is_dir() else 0o644)
        if target.exists():
            old = target.with_name(f".{target.name}.old-{os.getpid()}")
            target.rename(old)
            tmp.rename(target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_manifest(directory: Path, manifest_dict: dict) -> None:
    (directory / MANIFEST_NAME).write_text(json.dumps(manifest_dict, indent=2) + "\n")


def hash_files(directory: Path, names: list[str]) -> dict[str, str]:
    return {name: sha256_file(directory / name) for name in sorted(names)}


QUICK_FULL_HASH_BYTES = 8 << 20  # files up to this size are hashed whole even in a quick check
SAMPLE_WINDOWS = 16
SAMPLE_BYTES = 64 << 10


def sample_digest(path: Path, size: int) -> str:
    """SHA-256 of ``SAMPLE_WINDOWS`` windows of ``SAMPLE_BYTES`` spread evenly over the file
    (its first and last bytes included): 1 MiB read, whatever the file's size."""
    digest = hashlib.sha256()
    last = max(size - SAMPLE_BYTES, 0)
    with open(path, "rb") as f:
        for i in range(SAMPLE_WINDOWS):
            f.seek(last * i // (SAMPLE_WINDOWS - 1))
            digest.update(f.read(SAMPLE_BYTES))
    return digest.hexdigest()


def quick_checks(directory: Path, names: list[str]) -> dict[str, dict]:
    """Per large file, its size and sampled digest: what a load checks instead of hashing
    every byte (``edgert verify`` hashes every byte)."""
    checks = {}
    for name in sorted(names):
        size = (directory / name).stat().st_size
        if size > QUICK_FULL_HASH_BYTES:
            checks[name] = {"size": size, "sample_sha256": sample_digest(directory / name, size)}
    return checks


def read_manifest(path: Path) -> Manifest:
    """Read and validate ``edgert.json`` of an artifact directory (no hash check)."""
    path = Path(path)
    if not path.exists():
        raise ArtifactError(f"artifact {path} does not exist; create it with "
                            "`edgert export MODEL -o DIR`")
    if not path.is_dir():
        raise ArtifactError(f"artifact {path} is not a directory; pass the directory that "
                            "`edgert export` wrote")
    manifest_file = path / MANIFEST_NAME
    if not manifest_file.is_file():
        raise ArtifactError(f"{path} has no {MANIFEST_NAME}: not an edgert artifact, or an "
                            "interrupted export; re-run `edgert export`")
    try:
        data = json.loads(manifest_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ArtifactError(f"{manifest_file} is corrupt ({exc.__class__.__name__}); "
                            "re-export the model") from None
    if not isinstance(data, dict):
        raise ArtifactError(f"{manifest_file} is corrupt (not a JSON object); re-export the model")
    try:
        return Manifest.from_dict(data)
    except ConfigError as exc:
        raise ArtifactError(f"{manifest_file}: {exc}") from None


def _check_each(directory: Path, checks: dict[str, Callable[[Path], bool]], what: str,
                fix: str, progress: Callable[[str], None] | None = None) -> None:
    """Every file of ``checks`` exists in ``directory`` and passes its check; an
    ArtifactError naming the file, ``what`` was compared and ``fix`` otherwise."""
    for name, matches in checks.items():
        file = Path(directory) / name
        if not file.is_file():
            raise ArtifactError(f"artifact file {quote(str(file), 300)} is missing; {fix}")
        if progress:
            progress(name)
        if not matches(file):
            raise ArtifactError(f"artifact file {quote(str(file), 300)} does not match its "
                                f"recorded {what} (corrupt, truncated or modified); {fix}")


def _sha256_is(expected: str) -> Callable[[Path], bool]:
    return lambda file: sha256_file(file) == expected


def _sample_is(check: dict) -> Callable[[Path], bool]:
    def matches(file: Path) -> bool:
        size = file.stat().st_size
        return size == check["size"] and sample_digest(file, size) == check["sample_sha256"]

    return matches


def verify_hashes(directory: Path, hashes: dict[str, str], fix: str,
                  progress: Callable[[str], None] | None = None) -> None:
    """Check that every file of ``hashes`` (name -> SHA-256) exists in ``directory`` with its
    recorded digest; ArtifactError ending in ``fix`` otherwise."""
    _check_each(directory, {name: _sha256_is(digest) for name, digest in hashes.items()},
                "SHA-256", fix, progress)


REEXPORT = "the artifact is incomplete or damaged: re-export it"


def verify_files(path: Path, manifest: Manifest,
                 progress: Callable[[str], None] | None = None, full: bool = True) -> None:
    """Check every file listed in the manifest. ``full``: its SHA-256 over every byte. Quick
    (``full=False``): a large file's size and sampled digest (``quick_checks``), every other
    file's SHA-256; an artifact exported before quick checks existed is checked in full."""
    quick = {} if full else manifest.file_checks
    hashed = {name: digest for name, digest in manifest.files.items() if name not in quick}
    verify_hashes(path, hashed, REEXPORT, progress)
    _check_each(path, {name: _sample_is(check) for name, check in quick.items()},
                "size and sampled SHA-256", REEXPORT, progress)


# the graphs whose files a load reads the declared inputs and outputs of (the decoder ONNX
# Runtime runs and the Medusa heads: a few ms for SmolLM2's; the portable graph is TVM's
# input, read by the compiler, and the DHSA graph's 25k nodes would take ~20 ms)
CHECKED_GRAPHS = (GraphKey.ORT_GQA, GraphKey.MEDUSA)


def load_manifest(path: Path, verify: bool | str = True) -> Manifest:
    """Read the manifest and check the files: ``verify`` True or "quick" (sizes and sampled
    digests of the large files, SHA-256 of the rest), "full" (SHA-256 of every byte), False.
    Whatever ``verify``, the graphs of ``CHECKED_GRAPHS`` must declare the inputs and outputs
    the manifest lists (``check_graph_files``)."""
    if verify not in (True, False, "quick", "full"):
        raise ConfigError(f"verify must be True, False, 'quick' or 'full', got {verify!r}")
    manifest = read_manifest(path)
    remove_stale_temporaries(Path(path))  # of a killed export or compile into this path
    if verify:
        verify_files(Path(path), manifest, full=verify == "full")
    check_graph_files(Path(path), manifest)
    return manifest


def check_graph_files(path: Path, manifest: Manifest,
                      keys: tuple[str, ...] = CHECKED_GRAPHS) -> None:
    """Each graph of ``keys`` in the manifest is a well-formed ONNX file declaring exactly the
    inputs and outputs its spec lists (names, dtypes, fixed dimensions), and an attention
    node's head counts are the config's; ArtifactError naming the contradiction otherwise."""
    for key in keys:
        spec = manifest.graphs.get(key)
        if spec is None:
            continue
        file = Path(path) / spec.file
        if not file.is_file():  # (a FIFO or device would block or never end)
            raise ArtifactError(f"artifact file {quote(str(file), 300)} is missing; "
                                f"{REEXPORT}")
        try:
            signature = read_signature(file)
        except (OSError, ValueError) as exc:  # MalformedGraph is a ValueError
            what = exc if isinstance(exc, MalformedGraph) else exc.__class__.__name__
            raise ArtifactError(f"artifact file {quote(str(file), 300)} is not a readable ONNX "
                                f"graph ({what}); {REEXPORT}") from None
        _compare_signature(key, spec, signature, file.name)
        _compare_attention(manifest, signature, file.name)


def _compare_signature(key: str, spec: GraphSpec, signature: GraphSignature,
                       file: str) -> None:
    for kind, listed, declared in (("input", spec.inputs, signature.inputs),
                                   ("output", spec.outputs, signature.outputs)):
        names = [t.name for t in listed]
        if sorted(names) != sorted(declared):
            extra = sorted(set(names) - set(declared)) or sorted(set(declared) - set(names))
            raise ArtifactError(
                f"{MANIFEST_NAME} graphs.{key} {kind}s contradict {quote(file)} (which declares "
                f"{_short(sorted(declared))}; differing: {_short(extra)}); re-export the artifact")
        for tensor in listed:
            decl = declared[tensor.name]
            shape = decl.shape
            dims_differ = shape is not None and (len(shape) != len(tensor.shape) or any(
                isinstance(a, int) and isinstance(b, int) and a != b
                for a, b in zip(tensor.shape, shape)))
            if decl.dtype != tensor.dtype or dims_differ:
                raise ArtifactError(
                    f"{MANIFEST_NAME} graphs.{key} {quote(tensor.name)} {quote(tensor.dtype)} "
                    f"{_dims(tensor.shape)} contradicts {quote(file)}, which declares {decl.dtype} "
                    f"{_dims(shape)}; re-export the artifact")


def _compare_attention(manifest: Manifest, signature: GraphSignature, file: str) -> None:
    config = manifest.config
    for attribute, name in (("num_heads", "num_attention_heads"),
                            ("kv_num_heads", "num_key_value_heads")):
        got = signature.attention.get(attribute)
        if got is not None and got != getattr(config, name):
            raise ArtifactError(f"manifest config {name}={getattr(config, name)} contradicts the "
                                f"graph ({quote(file)}'s attention has {got} "
                                f"{'KV heads' if attribute == 'kv_num_heads' else 'heads'}); "
                                "re-export the artifact")


def _dims(shape) -> str:
    return "[" + ", ".join(quote(str(d), 40) for d in shape) + "]" if shape is not None else "[?]"


def _short(names: list[str], limit: int = 6) -> str:
    """Some names, quoted (a damaged file's may hold any character), for a one-line message."""
    return ", ".join(repr(n)[:60] for n in names[:limit]) + (
        ", ..." if len(names) > limit else "") or "none"


def update_manifest(path: Path, changes: dict) -> Manifest:
    """Rewrite fields of ``edgert.json`` in place, atomically (temp file + rename).

    Only the manifest changes; the hashed files are untouched, so hashes stay valid.
    """
    path = Path(path)
    manifest = read_manifest(path)
    data = manifest.to_dict()
    data.update(changes)
    updated = Manifest.from_dict(data)
    tmp = path / f".{MANIFEST_NAME}.tmp-{os.getpid()}"
    tmp.write_text(json.dumps(updated.to_dict(), indent=2) + "\n")
    os.replace(tmp, path / MANIFEST_NAME)
    return updated
