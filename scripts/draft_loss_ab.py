"""Same-steps A/B of draft-layer training options on train-draft's cached data (no new
answers).

    python scripts/draft_loss_ab.py CACHE_FILE TOKEN_TARGET TOKEN_WEIGHT STEPS \
        [FEATURE_LAYERS [FEATURE_DROPOUT]]

Trains on 95% of the cached sequences (every 20th held out) with DraftTrainOptions' defaults
but the given options, then prints the teacher-forced step-1 top-1 on the held-out sequences'
response rows. CACHE_FILE: ``DIR/cache/draft-data-<key>.pt`` from ``edgert train-draft``;
FEATURE_LAYERS (e.g. ``2,15``) must be the layers that file was built with; without them a
multi-layer file is read as its final hidden states alone (the same values a plain build
stores). Made bench/results/eval_draft_token_target.json's ``same_steps_ab`` and
eval_draft_feature_layers.json's.
"""

from __future__ import annotations

import sys
import time

import torch

from edgert.model.sources import load_model
from edgert.train.draft_data import DraftData
from edgert.train.draft_loop import (
    DraftTrainOptions,
    draft_forward,
    embed_tokens,
    pack,
    train_draft,
)


def subset(data: DraftData, chosen: list[int]) -> DraftData:
    spans = [data.span(s) for s in chosen]
    lengths = torch.tensor([span.stop - span.start for span in spans])
    offsets = torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)])
    return DraftData(torch.cat([data.tokens[s] for s in spans]),
                     torch.cat([data.hidden[s] for s in spans]),
                     torch.cat([data.argmax[s] for s in spans]), offsets,
                     data.prompt_lengths[chosen])


def held_out_top1(draft, data: DraftData, loaded) -> tuple[float, int]:
    lm_head_t = loaded.lm_head_t()
    projection = draft.select_vocab(lm_head_t)
    hits = rows_counted = 0
    with torch.no_grad():
        for start in range(0, data.sequences, 8):
            chosen = list(range(start, min(start + 8, data.sequences)))
            rows = pack(data, chosen, 1 << 20)
            out = draft_forward(draft, rows.features,
                                embed_tokens(rows.tokens, lm_head_t, loaded.config),
                                rows.positions, rows.bias)[0]
            predicted = draft.to_vocab(draft.logits(out, projection).argmax(-1))
            response = torch.cat([
                torch.arange(1, data.span(s).stop - data.span(s).start) >= data.prompt_lengths[s]
                for s in chosen])  # row t sits at position t+1
            hits += int((predicted[response] == rows.target_tokens[response]).sum())
            rows_counted += int(response.sum())
    return hits / rows_counted, rows_counted


def main(cache_file: str, token_target: str, token_weight: float, steps: int,
         feature_layers: tuple[int, ...] = (), feature_dropout: float = 0.1) -> None:
    loaded = load_model("smollm2-135m")
    data = DraftData.load(cache_file)
    if not feature_layers:
        data.hidden = data.hidden[:, :loaded.config.hidden_size]
    held = [s for s in range(data.sequences) if s % 20 == 0]
    train = [s for s in range(data.sequences) if s % 20]
    started = time.time()
    draft = train_draft(subset(data, train), loaded.config, loaded.lm_head_t(),
                        DraftTrainOptions(steps=steps, token_target=token_target,
                                          token_weight=token_weight,
                                          feature_layers=feature_layers,
                                          feature_dropout=feature_dropout))
    top1, rows = held_out_top1(draft, subset(data, held), loaded)
    layers = f", layers {list(feature_layers)} dropout {feature_dropout}" if feature_layers else ""
    print(f"{token_target} weight {token_weight}{layers}, {steps} steps: held-out step-1 top-1 "
          f"{top1:.4f} over {rows} rows, {time.time() - started:.0f} s")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], float(sys.argv[3]), int(sys.argv[4]),
         tuple(int(k) for k in sys.argv[5].split(",")) if len(sys.argv) > 5 else (),
         float(sys.argv[6]) if len(sys.argv) > 6 else 0.1)
