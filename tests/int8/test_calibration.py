"""load_calibration: each kind of source, the checks against the example inputs, and the held-out split."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from repfx.errors import CalibrationError
from repfx.int8 import images
from repfx.int8.calibration import MIN_SAMPLES, load_calibration

EXAMPLE = (torch.zeros(2, 3, 8, 8),)


def samples(count: int, shape=(3, 8, 8), seed: int = 0) -> torch.Tensor:
    return torch.randn((count, *shape), generator=torch.Generator().manual_seed(seed))


def flat(batches) -> torch.Tensor:
    return torch.cat([batch[0] for batch in batches])


def test_a_tensor_is_batched_like_the_example_and_split_one_in_five():
    data = samples(20)
    before = data.clone()
    result = load_calibration(data, EXAMPLE)
    assert [tuple(b[0].shape) for b in result.calibrate] == [(2, 3, 8, 8)] * 8
    assert [tuple(b[0].shape) for b in result.held_out] == [(2, 3, 8, 8)] * 2
    held = [i for i in range(20) if i % 5 == 4]  # floor((i+1)/5) > floor(i/5)
    assert torch.equal(flat(result.held_out), data[held])
    assert torch.equal(flat(result.calibrate), data[[i for i in range(20) if i not in held]])
    assert "16 samples calibrate, 4 held out (1 sample in 5)" in result.source
    assert torch.equal(data, before)
    result.calibrate[0][0].add_(1)  # batches are copies: the user's tensor is never written
    assert torch.equal(data, before)


def test_the_split_is_deterministic_and_held_out_never_calibrates():
    data = torch.arange(40.0).view(40, 1)
    first = load_calibration(data, (torch.zeros(1, 1),), held_out=0.3)
    again = load_calibration(data, (torch.zeros(1, 1),), held_out=0.3)
    assert [b[0].item() for b in first.held_out] == [b[0].item() for b in again.held_out]
    assert len(first.held_out) == 12  # floor(40 * 0.3)
    assert not {b[0].item() for b in first.held_out} & {b[0].item() for b in first.calibrate}
    assert load_calibration(data, (torch.zeros(1, 1),), held_out=0).held_out == []


def test_an_iterable_of_input_tuples_with_two_inputs_and_ragged_batches():
    example = (torch.zeros(4, 5), torch.zeros(4, 2, dtype=torch.int64))
    items = [(torch.randn(n, 5), torch.ones(n, 2, dtype=torch.int64)) for n in (3, 7, 10)]  # 20 samples
    result = load_calibration(iter(items), example, held_out=0.2)
    assert all(len(batch) == 2 and batch[0].shape == (4, 5) and batch[1].dtype == torch.int64
               for batch in result.calibrate + result.held_out)
    assert (len(result.calibrate), len(result.held_out)) == (4, 1)
    assert "3 input tuple(s)" in result.source


def test_items_may_be_bare_tensors_for_a_one_input_model():
    result = load_calibration([samples(5, seed=k) for k in range(4)], EXAMPLE)
    assert len(result.calibrate) + len(result.held_out) == 10


def test_npy_npz_and_pt_files(tmp_path):
    data = samples(10)
    np.save(tmp_path / "x.npy", data.numpy())
    np.savez(tmp_path / "x.npz", image=data.numpy())
    torch.save(data, tmp_path / "x.pt")
    torch.save([data], tmp_path / "list.pt")
    for name in ("x.npy", "x.npz", "x.pt", "list.pt"):
        result = load_calibration(tmp_path / name, EXAMPLE)
        assert torch.equal(torch.cat([flat(result.calibrate), flat(result.held_out)]).sort(0).values,
                           data[:10].sort(0).values), name
        assert name in result.source


def test_npz_gives_one_array_per_input_in_stored_order(tmp_path):
    a, b = np.random.default_rng(0).normal(size=(8, 4)).astype(np.float32), np.arange(8 * 3).reshape(8, 3)
    np.savez(tmp_path / "two.npz", first=a, second=b)
    result = load_calibration(tmp_path / "two.npz", (torch.zeros(1, 4), torch.zeros(1, 3, dtype=torch.int64)))
    assert torch.equal(result.calibrate[0][0], torch.from_numpy(a[:1]))
    assert torch.equal(result.calibrate[0][1], torch.from_numpy(b[:1]))


class Payload:
    def __reduce__(self):
        return (print, ("code ran",))


def test_a_pt_file_that_needs_code_to_unpickle_is_refused(tmp_path, capsys):
    torch.save(Payload(), tmp_path / "evil.pt")
    with pytest.raises(CalibrationError, match="weights_only=True"):
        load_calibration(tmp_path / "evil.pt", EXAMPLE)
    assert "code ran" not in capsys.readouterr().out


def test_a_folder_of_images_uses_timms_eval_transform(tmp_path):
    image = pytest.importorskip("PIL.Image")
    rng = np.random.default_rng(0)
    for k in range(10):
        size = (40, 30) if k % 2 else (30, 50)  # (width, height): portrait and landscape
        pixels = rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
        image.fromarray(pixels).save(tmp_path / f"{k:02d}.png")
    (tmp_path / "notes.txt").write_text("not an image")
    result = load_calibration(tmp_path, (torch.zeros(1, 3, 16, 16),))
    assert len(result.calibrate) == 8 and len(result.held_out) == 2
    assert "10 images; timm eval transform to 16x16" in result.source
    # the first file by hand: shorter edge to floor(16 / 0.875) = 18, bicubic, center crop, ImageNet normalization
    with image.open(tmp_path / "00.png") as opened:
        resized = opened.convert("RGB").resize((18, 30), image.Resampling.BICUBIC)
    crop = np.asarray(resized.crop((1, 7, 17, 23)), dtype=np.float32) / 255
    expected = (torch.from_numpy(crop).permute(2, 0, 1) - torch.tensor(images.MEAN).view(3, 1, 1)) / torch.tensor(
        images.STD).view(3, 1, 1)
    assert torch.allclose(result.calibrate[0][0][0], expected, atol=1e-6)


@pytest.mark.parametrize("height, width, size, resized", [
    (16, 16, (30, 50), (18, 30)),  # square input: shorter edge to floor(16 / 0.875)
    (16, 16, (50, 30), (30, 18)),
    (16, 24, (50, 30), (27, 18)),  # non-square: exactly floor(W / 0.875) x floor(H / 0.875)
])
def test_resize_follows_timm(height, width, size, resized):
    assert images.resize_size(size, height, width) == resized


@pytest.mark.parametrize("source, example, message", [
    (None, EXAMPLE, "precision='int8' needs calibration data"),
    (samples(4), EXAMPLE, f"holds 4 sample\\(s\\); INT8 needs at least {MIN_SAMPLES}"),
    (samples(10, shape=(3, 9, 8)), EXAMPLE, r"samples must be \[N, 3, 8, 8\]"),
    (samples(10).double(), EXAMPLE, "is torch.float64; the model's example input is torch.float32"),
    ([(samples(4), torch.zeros(4))] * 3, EXAMPLE, "yield model inputs only \\(no labels\\)"),
    ([], EXAMPLE, "empty"),
    (samples(8), (torch.zeros(8, 3, 8, 8),), "too few for one batch of 8"),
    (3.0, EXAMPLE, "is not calibration data"),
    ("/no/such/folder", EXAMPLE, "does not exist"),
])
def test_bad_data_is_one_line_naming_what_to_fix(source, example, message):
    with pytest.raises(CalibrationError, match=message) as caught:
        load_calibration(source, example)
    assert "\n" not in str(caught.value)


def test_a_single_sample_without_batch_dim_gets_a_hint():
    with pytest.raises(CalibrationError, match=r"add one with x\[None\]"):
        load_calibration([torch.zeros(3, 8, 8)] * 10, EXAMPLE)


def test_an_unreadable_image_is_named(tmp_path):
    pytest.importorskip("PIL.Image")
    (tmp_path / "broken.png").write_bytes(b"not a png")
    with pytest.raises(CalibrationError, match="broken.png could not be read"):
        load_calibration(tmp_path, (torch.zeros(1, 3, 8, 8),))


def test_a_folder_needs_a_three_channel_image_input(tmp_path):
    with pytest.raises(CalibrationError, match="one \\[N, 3, H, W\\] input"):
        load_calibration(tmp_path, (torch.zeros(1, 1, 8, 8),))
