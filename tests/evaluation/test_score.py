import json
import math
import warnings

import lpips
import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from transformers import (
    CLIPConfig,
    CLIPImageProcessorPil,
    CLIPModel,
    CLIPTextConfig,
    CLIPVisionConfig,
    ViTConfig,
    ViTModel,
)

from editlab.evaluation.ground_truth import GroundTruthMetrics
from editlab.evaluation.metrics import ClipScorer, KeyBackbone, PieBenchMetrics
from editlab.evaluation.piebench import rle_encode
from editlab.evaluation.score import find_edit, fit_to_source, main
from editlab.evaluation.summary import format_summary, summarize
from editlab.models.tokenizers import char_tokenizer

SIZE = 64



# ---------------------------------------------------------------------------------------------------------
# summary


def results_frame():
    nan, inf = math.nan, math.inf
    columns = ["editor", "edit_type", "error", "structure_distance", "psnr_unedit_part", "lpips_unedit_part",
               "mse_unedit_part", "ssim_unedit_part", "clip_similarity_target_image",
               "clip_similarity_target_image_edit_part", "seconds"]
    rows = [
        ("a", "1", "", 0.010, 20.0, 0.1, 0.01, 0.7, 25.0, 22.0, 1.0),
        ("a", "1", nan, 0.030, inf, 0.0, 0.0, 1.0, 27.0, 24.0, 3.0),  # NaN error = success; identical background
        ("a", "9", "", 0.020, nan, nan, nan, nan, 30.0, 30.0, 2.0),  # full mask
        ("a", "9", "RuntimeError: boom", 9.0, nan, nan, nan, nan, nan, nan, 99.0),
        ("b", "1", "", 0.5, 10.0, nan, nan, nan, nan, nan, 5.0),
    ]
    extra = {"nfe": 4, "peak_mem_mb": 100.0, "clip_similarity_source_image": 20.0, "gt_psnr": 30.0}
    return pd.DataFrame(rows, columns=columns).assign(**extra)


def test_summary_scales_nan_inf_and_counts():
    summary = summarize(results_frame())
    assert summary[["editor", "edit_type"]].values.tolist() == [["a", "1"], ["a", "9"], ["a", "all"], ["b", "1"],
                                                               ["b", "all"]]
    a1, a9, a_all = (summary.iloc[i] for i in range(3))
    assert a1["struct_x1e3"] == pytest.approx(20.0) and a1["lpips_x1e3"] == pytest.approx(50.0)
    assert a1["mse_x1e4"] == pytest.approx(50.0) and a1["ssim_x1e2"] == pytest.approx(85.0)
    assert a1["psnr"] == pytest.approx(20.0) and a1["n_psnr_inf"] == 1  # inf left out of the mean, counted
    assert a1["clip_whole"] == pytest.approx(26.0) and a1["clip_edited"] == pytest.approx(23.0)
    assert math.isnan(a9["psnr"]) and a9["n"] == 1 and a9["n_unedit"] == 0  # full mask; failed row dropped
    assert a_all["n"] == 3 and a_all["n_unedit"] == 2 and a_all["struct_x1e3"] == pytest.approx(20.0)
    assert a_all["seconds"] == pytest.approx(2.0) and a_all["nfe"] == 4 and a_all["peak_mem_mb"] == 100
    # columns without a paper name (their own, or unknown to the summary) are averaged unscaled
    assert a_all["gt_psnr"] == 30.0 and a_all["clip_similarity_source_image"] == 20.0
    assert "structure_distance" not in summary and "error" not in summary
    text = format_summary(summary)
    assert "struct_x1e3" in text and "20.00" in text


def test_summary_reads_back_csv_types(tmp_path):
    frame = results_frame()
    frame.to_csv(tmp_path / "r.csv", index=False)
    again = pd.read_csv(tmp_path / "r.csv")  # edit types come back as ints, empty errors as NaN
    pd.testing.assert_frame_equal(summarize(again), summarize(frame), check_dtype=False)


# ---------------------------------------------------------------------------------------------------------
# edit lookup and layout


def test_find_edit_by_stem(tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "1.png").touch()
    assert find_edit(tmp_path, "d/1.jpg") == tmp_path / "d" / "1.png"
    assert find_edit(tmp_path, "d/2.jpg") is None


def test_reference_panel_crop_and_resize():
    panel = np.zeros((512, 2048, 3), np.uint8)
    panel[..., 0] = np.arange(2048) % 256
    panel[..., 1] = np.arange(2048) // 256
    crop, note = fit_to_source(Image.fromarray(panel), (512, 512))
    assert np.array_equal(np.asarray(crop), panel[:, 1536:]) and "cropped" in note
    small, note = fit_to_source(Image.fromarray(panel[:100, :100]), (512, 512))
    assert small.size == (512, 512) and "resized 100x100" in note
    same, note = fit_to_source(crop, (512, 512))
    assert same is crop and note == ""


# ---------------------------------------------------------------------------------------------------------
# the CLI end to end on a PIE-Bench-format folder


def tiny_models():
    torch.manual_seed(0)
    vit = ViTModel(ViTConfig(image_size=224, patch_size=8, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                             intermediate_size=37), add_pooling_layer=False)
    text = CLIPTextConfig(vocab_size=514, hidden_size=32, intermediate_size=37, num_hidden_layers=1,
                          num_attention_heads=2, max_position_embeddings=77, bos_token_id=0, eos_token_id=1,
                          pad_token_id=1)
    vision = CLIPVisionConfig(image_size=32, patch_size=8, hidden_size=32, intermediate_size=37, num_hidden_layers=1,
                              num_attention_heads=2)
    clip = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16))
    processor = CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    return vit, clip, char_tokenizer(), processor


@pytest.fixture
def bench(tmp_path):
    """Five 64x64 items: a 4-panel edit, an identical edit, a smaller edit, a missing edit, a full-mask style edit."""
    rng = np.random.default_rng(0)
    data, edits = tmp_path / "PIE-Bench_v1", tmp_path / "my_method" / "annotation_images"
    box = np.zeros((SIZE, SIZE))
    box[16:40, 8:48] = 1
    mapping = {}
    for image_id, edit_type, rle in [("000000000000", 0, rle_encode(box)), ("000000000001", 0, rle_encode(box)),
                                     ("111000000000", 1, rle_encode(box)), ("111000000001", 1, rle_encode(box)),
                                     ("924000000000", 9, [0, SIZE * SIZE])]:
        folder = f"{edit_type}_type/1_artificial"
        mapping[image_id] = {"image_path": f"{folder}/{image_id}.jpg", "original_prompt": "a [red] cube",
                             "editing_prompt": "a [blue] cube", "editing_instruction": "make it blue",
                             "editing_type_id": str(edit_type), "blended_word": "cube cube" if edit_type else "",
                             "mask": rle}
        for root in (data / "annotation_images", edits):
            (root / folder).mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)).save(
            data / "annotation_images" / folder / f"{image_id}.jpg")
    (data / "mapping_file.json").write_text(json.dumps(mapping))

    def source(image_id):
        return np.asarray(Image.open(data / "annotation_images" / mapping[image_id]["image_path"]).convert("RGB"))

    def edit_path(image_id, ext=".png"):
        return edits / mapping[image_id]["image_path"].replace(".jpg", ext)

    panel = rng.integers(0, 256, (SIZE, 4 * SIZE, 3), dtype=np.uint8)
    panel[:, 3 * SIZE :] = source("000000000000")  # the edit panel is the source itself
    Image.fromarray(panel).save(edit_path("000000000000"))
    Image.fromarray(source("000000000001")).save(edit_path("000000000001"))
    Image.fromarray(rng.integers(0, 256, (SIZE // 2, SIZE // 2, 3), dtype=np.uint8)).save(
        edit_path("111000000000", ".webp"))
    Image.fromarray(rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)).save(edit_path("924000000000"))
    return data, edits


def test_score_cli_with_injected_backbones(bench, tmp_path, capsys):
    data, edits = bench
    vit, clip, tokenizer, processor = tiny_models()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        lpips_net = lpips.LPIPS(net="squeeze", pnet_rand=True, pretrained=True, verbose=False)
    metrics = PieBenchMetrics(KeyBackbone.from_vit(vit), ClipScorer(clip, tokenizer, processor), lpips_net)
    out = tmp_path / "scores" / "run.csv"
    main(["--data", str(data), "--edits", str(edits), "--out", str(out), "--device", "cpu", "--mask-size", str(SIZE)],
         metrics=metrics)

    rows = pd.read_csv(out, dtype={"image_id": str, "edit_type": str}).fillna({"error": "", "note": ""})
    assert list(rows.columns) == ["image_id", "edit_type", *PieBenchMetrics.columns, *GroundTruthMetrics.columns,
                                  "error", "note"]
    rows = rows.set_index("image_id")
    panel, same, small, missing, style = (rows.loc[i] for i in rows.index)
    # the right-most panel equals the source: identical-image values
    assert "cropped 256x64" in panel["note"] and panel["mse_unedit_part"] == 0 and panel["structure_distance"] == 0
    assert panel["psnr_unedit_part"] == math.inf and panel["error"] == ""
    assert same["mse_unedit_part"] == 0 and same["note"] == ""
    assert "resized 32x32 to 64x64" in small["note"] and small["mse_unedit_part"] > 0
    assert missing["error"].startswith("FileNotFoundError") and math.isnan(missing["structure_distance"])
    assert math.isnan(style["psnr_unedit_part"]) and math.isnan(style["lpips_unedit_part"])
    assert style["clip_similarity_target_image"] >= 0 and math.isfinite(style["structure_distance"])

    summary = pd.read_csv(tmp_path / "scores" / "run_summary.csv", dtype={"edit_type": str})
    assert set(summary["editor"]) == {"my_method"}  # the folder above annotation_images/
    overall = summary[summary["edit_type"] == "all"].iloc[0]
    assert overall["n"] == 4 and overall["n_unedit"] == 3 and overall["n_psnr_inf"] == 2
    printed = capsys.readouterr().out
    assert "scored 4/5 edits (1 errors)" in printed and "struct_x1e3" in printed


def test_score_cli_builds_backbones_from_flags(bench, tmp_path, capsys):
    data, edits = bench
    vit, clip, tokenizer, processor = tiny_models()
    vit.save_pretrained(tmp_path / "vit")
    for part in (clip, tokenizer, processor):
        part.save_pretrained(tmp_path / "clip")
    args = ["--data", str(data), "--edits", str(edits), "--device", "cpu", "--edit-types", "0", "--limit", "1",
            "--structure-path", str(tmp_path / "vit"), "--clip-path", str(tmp_path / "clip"), "--lpips-net", "none",
            "--name", "flags", "--mask-size", str(SIZE)]
    results = main(args)
    assert results["image_id"].tolist() == ["000000000000"]
    row = results.iloc[0]
    assert row["structure_distance"] == 0 and math.isfinite(row["clip_similarity_target_image"])
    assert math.isnan(row["lpips_unedit_part"])
    assert "unavailable metrics (NaN): lpips_unedit_part" in capsys.readouterr().out
    assert (edits.parent / "scores.csv").is_file() and (edits.parent / "scores_summary.csv").is_file()

    broken = [*args, "--structure-path", str(tmp_path / "absent")]
    with pytest.raises(SystemExit, match="structure_distance"):
        main(broken)
    results = main([*broken, "--on-missing", "warn"])
    assert math.isnan(results.iloc[0]["structure_distance"])
