"""Linear probe: how well each cell's shape and colour can be read off a policy's image tokens.

    python benchmarks/probes/vit_probe.py N_SCENES POLICY_DIR [POLICY_DIR ... | random]

Draws N_SCENES grid scenes (4 x 4 cells of the grid layout, each empty with probability 0.4, else a random
shape and colour), runs each policy's vision tower + merger, and fits a softmax regression per cell
token on 80% of the scenes; prints held-out accuracy for shape (or empty), colour (or empty) and both.
``random`` is a freshly initialised model with the first policy's config.
"""
import random
import sys

import torch


def _scenes(n: int):
    from dualrpo_mcore.data.synth.common import COLOURS, SHAPES, canvas, draw_shape
    from dualrpo_mcore.data.synth.grid import CELL, SIDE, cell_box

    rng, colours = random.Random(0), list(COLOURS)
    images, shapes, cols = [], [], []
    for _ in range(n):
        img, draw = canvas(SIDE * CELL, SIDE * CELL)
        for r in range(SIDE):
            for c in range(SIDE):
                if rng.random() < 0.4:
                    shapes.append(0), cols.append(0)
                    continue
                s, k = rng.randrange(len(SHAPES)), rng.randrange(len(colours))
                draw_shape(draw, SHAPES[s], cell_box(r, c), COLOURS[colours[k]])
                shapes.append(s + 1), cols.append(k + 1)
        images.append(img)
    return images, torch.tensor(shapes), torch.tensor(cols)


def _fit(x: torch.Tensor, y: torch.Tensor) -> float:
    n = int(0.8 * len(y))
    x = (x - x[:n].mean(0)) / (x[:n].std(0) + 1e-6)
    k = int(y.max()) + 1
    w = torch.zeros(x.shape[1], k, requires_grad=True)
    b = torch.zeros(k, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=300, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(x[:n] @ w + b, y[:n]) + 1e-4 * (w ** 2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return float(((x[n:] @ w + b).argmax(1) == y[n:]).float().mean())


def main(n: int, policies) -> None:
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    from dualrpo_mcore.data.images import ImageProcessor

    images, shapes, cols = _scenes(n)
    processed = ImageProcessor()(images)
    for pol in policies:
        if pol == "random":
            torch.manual_seed(0)
            model = Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig.from_pretrained(policies[0]))
        else:
            model = Qwen2_5_VLForConditionalGeneration.from_pretrained(pol)
        with torch.no_grad():
            out = model.float().eval().model.get_image_features(processed.pixel_values, processed.image_grid_thw)
        out = getattr(out, "pooler_output", out)
        feats = torch.cat(list(out)) if isinstance(out, (list, tuple)) else out
        feats = feats.float()
        print(f"{pol}: shape {_fit(feats, shapes):.3f}  colour {_fit(feats, cols):.3f}  "
              f"both {_fit(feats, shapes * 7 + cols):.3f}")


if __name__ == "__main__":
    if len(sys.argv) < 3:
        sys.exit(__doc__)
    main(int(sys.argv[1]), sys.argv[2:])
