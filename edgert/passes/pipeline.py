"""edgert's compile pipeline, by phase, registered by name (like TVM's relax/pipeline.py).

    phase "import"   ONNX -> Relax            (tvm.relax.frontend.onnx, dynamic dims kept)
    phase "edgert"   edgert passes            FuseDHSAPrefill (when the artifact has DHSA: a
                                              second function, prefill_dhsa, with the DHSA
                                              kernels), FuseTreeAttention (attention -> in-place
                                              kernels),
                                              FuseParallelMatmuls (CPU: q/k/v and gate/up
                                              into one matmul each),
                                              FuseDequantizeMatmul (block-quantized weights ->
                                              dequantizing matmul kernels, knobs from the
                                              tuning DB),
                                              PackMatmulWeights (CPU: constant-weight matmuls ->
                                              panel-packed kernels, knobs from the tuning DB)
    the "draft" pipeline (draft.portable.onnx): FuseTreeAttention over the draft's own cache,
                                              the mask a dense visibility row per draft row;
                                              then the same weight passes
    phase "legalize" remaining ops -> TIR     (DispatchSortScan, LegalizeOps, FuseOps, FuseTIR;
                                               under the target)
    phase "build"    tvm.compile for the target (its default build pipeline)

``--dump-ir DIR`` writes the module after each phase as ``DIR/<n>-<phase>.py`` (TVMScript).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import tvm
from tvm import relax

from edgert.dhsa.params import DHSAParams
from edgert.errors import EdgertError
from edgert.model.config import DecoderConfig
from edgert.passes.fuse_dequantize_matmul import FuseDequantizeMatmul
from edgert.passes.fuse_dhsa_prefill import FuseDHSAPrefill
from edgert.passes.fuse_parallel_matmuls import FuseParallelMatmuls
from edgert.passes.fuse_tree_attention import FuseTreeAttention
from edgert.passes.lower_topk import LowerTopK
from edgert.passes.narrow_to_int32 import NarrowGenericIndices, NarrowToInt32
from edgert.passes.pack_matmul_weights import PackMatmulWeights
from edgert.passes.tuning.database import TuningDatabase
from edgert.passes.tuning.tunable import get_tunable


@dataclass(frozen=True)
class CompileContext:
    """What the passes of one build need to know."""

    config: DecoderConfig
    gpu: bool = False  # emit GPU loop mappings (thread blocks); else CPU
    tuning: TuningDatabase = field(default_factory=TuningDatabase)
    dhsa: DHSAParams | None = None  # the artifact's DHSA parameters: also build prefill_dhsa
    int32_only: bool = False  # the target has no 64-bit integers (WebGPU): narrow them all

    def knobs(self, kernel: str, *shape):
        """The knobs of a tunable kernel (``passes.tuning.tunable.TUNABLE``) at a shape: the
        tuning database's best, else the untuned default."""
        return get_tunable(kernel).knobs_for(self.tuning, *shape)


@dataclass(frozen=True)
class Phase:
    name: str
    passes: Callable[[CompileContext], list]


def _edgert_passes(ctx: CompileContext) -> list:
    config = ctx.config
    shape = (config.num_attention_heads, config.num_key_value_heads, config.head_dim)
    knobs = ctx.knobs("tree_attention", *shape)
    passes = []
    if ctx.dhsa is not None:  # first: it copies the imported main's attention cores
        passes.append(FuseDHSAPrefill(*shape, ctx.dhsa, gpu=ctx.gpu, knobs=knobs,
                                      dhsa_knobs=ctx.knobs("dhsa_attention", *shape),
                                      index_dtype="int32" if ctx.int32_only else "int64"))
    passes.append(FuseTreeAttention(*shape, gpu=ctx.gpu, knobs=knobs,
                                    softcap=ctx.config.attn_logit_softcapping))
    if not ctx.gpu:  # q/k/v and gate/up: one wider weight stream, fewer thread-pool launches
        passes.append(FuseParallelMatmuls())
    return passes + _weight_passes(ctx)


def _draft_passes(ctx: CompileContext) -> list:
    """The draft layer: one decoder layer of the backbone's shape over its own cache; its
    attention takes a visibility mask (a dynamic draft tree's rows see their ancestors among
    the rows of earlier draft calls, which no per-call interval can say)."""
    config = ctx.config
    shape = (config.num_attention_heads, config.num_key_value_heads, config.head_dim)
    passes = [FuseTreeAttention(*shape, gpu=ctx.gpu, knobs=ctx.knobs("tree_attention", *shape),
                                softcap=config.attn_logit_softcapping, mask="visibility")]
    if not ctx.gpu:
        passes.append(FuseParallelMatmuls())
    return passes + _weight_passes(ctx)


def _weight_passes(ctx: CompileContext) -> list:
    # block-quantized weights first: the kernels that dequantize them, on every target
    passes = [FuseDequantizeMatmul(functools.partial(ctx.knobs, "quant_matmul"), gpu=ctx.gpu,
                                   index_dtype="int32" if ctx.int32_only else "int64")]
    if ctx.int32_only:  # WebGPU: TVM's generic GPU top-k needs blockIdx.z, which it lacks
        return passes + [NarrowToInt32(), LowerTopK(gpu=True)]
    return passes + ([] if ctx.gpu else [PackMatmulWeights(functools.partial(ctx.knobs,
                                                                               "matmul"))])


def _legalize_passes(ctx: CompileContext) -> list:
    # sort/top-k have no LegalizeOps rule: DispatchSortScan picks the target's kernel (it needs
    # the target in scope; the adreno pipeline of tvm.compile never runs it)
    passes = [relax.backend.DispatchSortScan(), relax.transform.LegalizeOps(),
              relax.transform.AnnotateTIROpPattern(), relax.transform.FoldConstant(),
              relax.transform.FuseOps(), relax.transform.FuseTIR(),
              relax.transform.DeadCodeElimination()]
    if ctx.int32_only:  # loop and buffer indices, and the kernels' scalar shape parameters
        passes.append(NarrowGenericIndices())
    return passes


PIPELINES: dict[str, list[Phase]] = {
    "decoder": [Phase("edgert", _edgert_passes), Phase("legalize", _legalize_passes)],
    "draft": [Phase("edgert", _draft_passes), Phase("legalize", _legalize_passes)],
    # graphs without attention (Medusa heads)
    "plain": [Phase("edgert", _weight_passes), Phase("legalize", _legalize_passes)],
}


def get_pipeline(name: str) -> list[Phase]:
    if name not in PIPELINES:
        raise EdgertError(f"unknown pipeline '{name}'; available: {', '.join(PIPELINES)}")
    return PIPELINES[name]


def run_pipeline(mod: tvm.IRModule, name: str, ctx: CompileContext,
                 dump_ir: Path | None = None, tag: str = "") -> tvm.IRModule:
    """Apply the named pipeline phase by phase, dumping IR after each when asked."""
    phases = get_pipeline(name)
    if dump_ir is not None:
        dump_ir.mkdir(parents=True, exist_ok=True)
        (dump_ir / f"{tag}0-import.py").write_text(mod.script())
    for n, phase in enumerate(phases, 1):
        mod = tvm.transform.Sequential(phase.passes(ctx))(mod)
        if dump_ir is not None:
            (dump_ir / f"{tag}{n}-{phase.name}.py").write_text(mod.script())
    return mod
