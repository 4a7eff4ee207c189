"""Drawn boxes: captions on a filled box of the class colour, sized to the image; tiny images
drawn enlarged; one colour per class, shared by `Results.plot`."""

from __future__ import annotations

import torch

import freeanchor.results
from freeanchor.results import Results
from freeanchor.viz import caption_spot, class_color, draw_boxes, text_color, upscale

GREY = 128


def _grey(h: int, w: int) -> torch.Tensor:
    return torch.full((3, h, w), GREY, dtype=torch.uint8)


def _caption_rows(drawn: torch.Tensor, color: tuple[int, int, int], box, width: int):
    """Rows (y) where the caption's filled background shows (the box's top and bottom edges,
    `width` px each, left out)."""
    mask = (drawn == torch.tensor(color, dtype=torch.uint8)[:, None, None]).all(0)
    y1, y2 = int(box[1]), int(box[3])
    edges = set(range(y1, y1 + width)) | set(range(y2 - width + 1, y2 + 1))
    return torch.tensor([y for y in torch.nonzero(mask.sum(1) > 20).flatten().tolist()
                         if y not in edges])  # fmt: skip


def test_caption_on_a_filled_background_in_a_contrasting_colour():
    color = class_color(3)
    box = torch.tensor([[100.0, 100.0, 300.0, 250.0]])
    drawn = draw_boxes(_grey(400, 600), box, ["dog 0.40"], [color], width=2)
    rows = _caption_rows(drawn, color, box[0].tolist(), 2)
    assert rows.numel() and rows.max() < 100  # above the box, filled with the class colour
    band = drawn[:, int(rows.min()) : int(rows.max()) + 1, 100:200].reshape(3, -1).T
    kinds = {tuple(p) for p in band.tolist()}
    assert text_color(color) in kinds  # glyphs in black or white, whichever reads better
    assert tuple(drawn[:, 175, 100].tolist()) == color  # the box's left edge
    assert tuple(drawn[:, 390, 590].tolist()) == (GREY, GREY, GREY)  # untouched elsewhere


def test_text_colour_contrast():
    assert text_color((255, 255, 0)) == (0, 0, 0) and text_color((20, 20, 160)) == (255,) * 3


def test_caption_grows_with_the_image_and_stays_inside_it():
    sizes = []
    for side in (200, 1600):
        box = [0.0, 0.0, side / 2, side / 2]
        drawn = draw_boxes(_grey(side, side), torch.tensor([box]), ["cat 0.99"],
                           [class_color(0)])  # fmt: skip
        rows = _caption_rows(drawn, class_color(0), box, max(1, round(side / 320)))
        assert rows.min() >= 0 and rows.max() < side / 2  # no room above: inside the top edge
        sizes.append(int(rows.max() - rows.min()))
    assert sizes[1] > 4 * sizes[0]  # about proportional (x8 image, font from 10 px to 48 px)


def test_tiny_images_are_drawn_enlarged():
    img = torch.randint(0, 256, (3, 96, 64), dtype=torch.uint8)
    big, factor = upscale(img, 512)
    assert factor == 6 and big.shape == (3, 576, 384)
    assert torch.equal(big, img.repeat_interleave(6, 1).repeat_interleave(6, 2))  # nearest
    assert upscale(img, 0)[0] is img and upscale(img, 96)[1] == 1.0
    drawn = draw_boxes(img, torch.tensor([[10.0, 20.0, 30.0, 40.0]]), None, [class_color(1)],
                       width=3, min_long_side=512)  # fmt: skip
    assert drawn.shape == (3, 576, 384)
    assert tuple(drawn[:, 150, 60].tolist()) == class_color(1)  # box edge x=10 -> 60
    assert torch.equal(drawn[:, 400:, 300:], big[:, 400:, 300:])
    assert torch.equal(draw_boxes(img, torch.zeros(0, 4), min_long_side=512), big)


def test_results_plot_uses_the_class_colours_of_viz():
    assert not hasattr(freeanchor.results, "_color")  # one palette, in viz
    res = Results(boxes=torch.tensor([[10.0, 10.0, 60.0, 60.0], [70.0, 70.0, 90.0, 95.0]]),
                  scores=torch.tensor([0.9, 0.5]), labels=torch.tensor([2, 4]),
                  names=["a", "b"], path=None, orig_shape=(100, 100),
                  image=_grey(100, 100))  # fmt: skip
    drawn = res.plot()  # numpy [H, W, 3]
    assert tuple(drawn[40, 10].tolist()) == class_color(2)
    assert tuple(drawn[85, 70].tolist()) == class_color(4)
    assert len({class_color(k) for k in range(80)}) == 80  # one colour per class


def test_the_first_box_is_on_top_and_captions_do_not_hide_each_other():
    box = [40.0, 60.0, 200.0, 200.0]
    drawn = draw_boxes(_grey(300, 300), torch.tensor([box, box]), ["dog 0.90", "cat 0.40"],
                       [class_color(0), class_color(1)], width=3)  # fmt: skip
    assert tuple(drawn[:, 130, 40].tolist()) == class_color(0)  # the shared left edge

    def rows(color, y_from, y_to):
        band = drawn[:, y_from:y_to, :]
        return int((band == torch.tensor(color, dtype=torch.uint8)[:, None, None]).all(0).sum())

    # the best caption above the box, the other one just inside its top edge, both whole
    assert rows(class_color(0), 0, 60) > 100 and rows(class_color(1), 0, 60) == 0
    assert rows(class_color(1), 63, 100) > 100


def test_caption_spots_avoid_earlier_captions_and_stay_inside():
    placed = []
    box = (10.0, 50.0, 90.0, 120.0)
    for _ in range(4):  # the same box 4 times: above, inside top, below, inside bottom
        placed.append(caption_spot(box, 40, 12, placed, 200, 200))
    assert [r[1] for r in placed] == [38.0, 50.0, 120.0, 108.0]
    assert all(_area(a, b) == 0 for i, a in enumerate(placed) for b in placed[i + 1 :])
    # a fifth finds no free spot: the least covered one, still inside the image
    fifth = caption_spot(box, 40, 12, placed, 200, 200)
    assert 0 <= fifth[1] and fifth[3] <= 200
    # at the image's top and right edges: inside the box, shifted left to fit
    x1, y1, x2, y2 = caption_spot((180.0, 0.0, 200.0, 30.0), 40, 12, [], 200, 200)
    assert (x1, y1, x2, y2) == (160.0, 0.0, 200.0, 12.0)


def _area(a, b):
    return max(0, min(a[2], b[2]) - max(a[0], b[0])) * max(0, min(a[3], b[3]) - max(a[1], b[1]))
