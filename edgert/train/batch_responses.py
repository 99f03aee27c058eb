"""The backbone's self-distillation answers from an exported artifact's parallel slots.

The same prompts, chat formatting, greedy/sampled split and limits as
``edgert.train.distill.generate_responses``, decoded by ``edgert.runtime.batch`` over the
artifact (ONNX Runtime) instead of transformers' ``generate``: on a 2-core CPU eight slots of
the default q4 artifact answer about four times faster. The answers are the artifact's own
(its weights and compute mode); the features the draft layer trains on still come from the
transformers forward of the source model (``edgert.train.draft_data``).
"""

from __future__ import annotations

from collections.abc import Callable

from edgert.runtime.batch import BatchDecoder, BatchSequence
from edgert.runtime.sampling import SamplingParams
from edgert.train.distill import DistillOptions, PromptEncoder


def generate_responses_batched(engine, encoder: PromptEncoder, prompts: list[str],
                               options: DistillOptions, slots: int = 8,
                               progress: Callable[[int], None] = lambda n: None
                               ) -> list[tuple[list[int], list[int]]]:
    """(prompt_ids, response_ids) per prompt, in order; the last ``sampled_share`` of the
    prompts sampled (temperature, top-p, a seed per prompt), the rest greedy."""
    sampled_from = len(prompts) - int(round(len(prompts) * options.sampled_share))
    decoder = BatchDecoder(engine, slots, speculative="off")
    sequences = []
    for number, prompt in enumerate(prompts):
        ids = encoder.chat(prompt)[0][-options.max_prompt_tokens:]
        params = (SamplingParams(options.temperature, options.top_p, 0,
                                 options.seed * 100_003 + number)
                  if number >= sampled_from else SamplingParams())
        sequences.append(BatchSequence(ids, options.max_new_tokens, params,
                                       on_end=lambda reason: progress(1)))
    waiting = list(sequences)
    while waiting or decoder.active:
        while waiting and decoder.can_admit(waiting[0]):
            decoder.admit(waiting.pop(0))
        decoder.step()
    return [(seq.prompt_ids, seq.output) for seq in sequences]
