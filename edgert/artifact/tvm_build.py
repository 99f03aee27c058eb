"""What ``edgert compile`` writes under ``ARTIFACT/tvm/<target>/`` and the TVM backend reads.

One home for the build's file and function names, imported by the writer
(``edgert.passes.build``, the kernels that carry the names) and the reader
(``edgert.runtime.backends.tvm_vm``)::

    tvm/<target>/
      decoder.so      the Relax VM executable of model.onnx: ``main`` (a decode step or a tree
                      over the cache) and, with DHSA, ``prefill_dhsa`` (the sparse prefill)
      medusa.so       the Medusa heads (when the artifact has them)
      draft.so        the draft layer (draft.portable.onnx, when the artifact has it): ``main``,
                      one draft call over the draft's own cache
      kv_commit.so    ``edgert_kv_commit``: the device KV cache's commit of accepted entries
      *.cu|.cl|.metal|.wgsl, *.fatbin   device sources (GPU targets), CUDA fatbins
      build.json      the build record (also kept in edgert.json under ``compiled``)
      tuning.json, metaschedule/   the tuning database (``edgert tune``), kept across builds

The record in the manifest (``Manifest.compiled[target]``) is read as a :class:`TvmBuild`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgert.artifact.io import verify_hashes
from edgert.errors import ArtifactError
from edgert.model.config import reject_unknown_fields

TVM_DIR = "tvm"
BUILD_RECORD = "build.json"
TUNING_DATABASE = "tuning.json"
METASCHEDULE_DIR = "metaschedule"
KEPT_ACROSS_BUILDS = (TUNING_DATABASE, METASCHEDULE_DIR)  # a rebuild keeps the tuning

# library stems: ``<stem>.so``, and ``<stem>.<ext>`` for the device sources
DECODER = "decoder"
MEDUSA = "medusa"
DRAFT = "draft"
KV_COMMIT = "kv_commit"

DHSA_FUNCTION = "prefill_dhsa"  # the decoder's second function, when the artifact has DHSA
KV_COMMIT_FUNCTION = "edgert_kv_commit"


def library(stem: str) -> str:
    """The loadable library file of a build stem (``decoder`` -> ``decoder.so``)."""
    return f"{stem}.so"


def build_directory(artifact: Path, target: str) -> Path:
    return Path(artifact) / TVM_DIR / target


@dataclass(frozen=True)
class TvmBuild:
    """One target's build as recorded in the manifest (``compiled[target]``)."""

    kind: str
    output: str  # "library", "library+source" or "source" (see passes.targets.TargetSpec)
    files: list[str]
    hashes: dict[str, str]  # file -> SHA-256
    notes: list[str] = field(default_factory=list)  # why anything expected was not written
    tuned: dict[str, Any] = field(default_factory=dict)  # workload -> knobs applied
    seconds: float = 0.0
    cuda_kernels: str | None = None  # cuda: "fatbin (...)" or "source, compiled when loaded"

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TvmBuild:
        reject_unknown_fields(cls, data, "edgert.json compiled build")
        return cls(**data)

    def to_dict(self) -> dict[str, Any]:
        out = {"kind": self.kind, "output": self.output, "files": list(self.files),
               "notes": list(self.notes), "hashes": dict(self.hashes), "tuned": self.tuned,
               "seconds": self.seconds}
        if self.cuda_kernels is not None:
            out["cuda_kernels"] = self.cuda_kernels
        return out

    def has_library(self, stem: str) -> bool:
        return library(stem) in self.files

    def verify(self, artifact: Path) -> None:
        """Every file of the build exists with its recorded SHA-256; ArtifactError naming the
        fix otherwise."""
        verify_hashes(build_directory(artifact, self.kind), self.hashes,
                      f"re-run `edgert compile {artifact} --target {self.kind}`")


def read_build(compiled: dict[str, Any], artifact: Path, target: str) -> TvmBuild:
    """The manifest's record of ``target``'s build; ArtifactError when there is none."""
    data = compiled.get(target)
    if not data:
        raise ArtifactError(f"artifact {artifact} has no TVM build for {target}; run "
                            f"`edgert compile {artifact} --target {target}` first")
    try:
        return TvmBuild.from_dict(data)
    except (TypeError, ValueError) as exc:
        raise ArtifactError(f"the {target} build record of {artifact} is malformed ({exc}); "
                            f"re-run `edgert compile {artifact} --target {target}`") from None
