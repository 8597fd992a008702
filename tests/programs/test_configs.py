from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import OmegaConf

from editlab.editors.base import editor_arguments
from editlab.editors.p2p import P2PSettings

CONF = Path(__file__).resolve().parents[2] / "editlab" / "conf"
GROUPS = ("model", "precision", "offload", "dataset", "editor", "settings", "metrics", "logger", "debug",
          "experiment")
OPTIONS = [(group, path.stem) for group in GROUPS for path in sorted((CONF / group).glob("*.yaml"))]


@pytest.fixture
def hydra_conf():
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        yield
    GlobalHydra.instance().clear()


def test_every_group_has_options():
    assert {group for group, _ in OPTIONS} == set(GROUPS)


@pytest.mark.parametrize(("group", "option"), OPTIONS, ids=[f"{g}={o}" for g, o in OPTIONS])
def test_every_config_file_composes(hydra_conf, group, option):
    cfg = compose(config_name="run", overrides=[f"{group}={option}"], return_hydra_config=True)
    container = OmegaConf.to_container(cfg, resolve=False)
    assert {"model", "precision", "offload", "dataset", "editor", "metrics", "logger"} <= container.keys()
    for key in ("model", "editor", "dataset", "logger"):
        assert cfg[key].name, f"{group}={option}: {key}.name is empty"
    assert cfg.precision.dtype in ("float32", "float16", "bfloat16")
    assert cfg.offload.mode in ("none", "model", "sequential")


def test_default_is_the_offline_toy_tour(hydra_conf):
    cfg = compose(config_name="run", return_hydra_config=True)
    assert str(cfg.hydra.mode) == "RunMode.MULTIRUN" and cfg.hydra.callbacks.sweep_report
    editors = cfg.hydra.sweeper.params.editor.split(",")
    # the tour names what it leaves out
    without_toy_model = {"icd_sdxl", "lcm_controlnet", "flowedit_flux", "rf_inversion_sd3", "flux_kontext",
                         "qwen_image_edit"}
    assert set(editors) == {p.stem for p in (CONF / "editor").glob("*.yaml")} - without_toy_model
    assert all(name in " ".join(cfg.sweep_notes) for name in without_toy_model)
    assert (cfg.model.name, cfg.metrics.label, cfg.dataset.name, cfg.dataset.size) == ("toy", "toy", "builtin", 32)
    assert cfg.logger.mode == "offline"
    for editor in editors:  # each at its toy settings where it has them, else at its own
        job = compose(config_name="run", overrides=[f"editor={editor}"])
        own = compose(config_name="run", overrides=[f"editor={editor}", "experiment=toy"]).editor
        toy = CONF / "editor_settings" / "toy" / f"{editor}.yaml"
        expected = OmegaConf.merge(own, OmegaConf.load(toy)) if toy.is_file() else own
        assert job.editor == expected and job.model.name == "toy"
    ip2p = compose(config_name="run", overrides=["editor=instruct_pix2pix"])
    assert ip2p.model.variants.instruct_pix2pix.unet_path == "./weights/toy/ip2p_unet"  # its InstructPix2Pix UNet
    assert "unet_path" not in ip2p.editor  # the editor does not carry model paths
    for overrides in (["editor=icd"], ["experiment=toy", "editor=icd"]):  # the toy model's adapters, at any settings
        assert compose(config_name="run", overrides=overrides).editor.reverse_lora.startswith("./weights/toy/icd/")
    assert compose(config_name="run", overrides=["~experiment", "editor=icd"]).editor.reverse_lora is None


def test_toy_settings_are_optional_and_the_command_line_wins(hydra_conf):
    assert compose(config_name="run", overrides=["editor=identity"]).editor.name == "identity"  # no settings file
    cfg = compose(config_name="run", overrides=["editor=npi", "editor.num_steps=4"]).editor
    assert (cfg.num_steps, cfg.guidance_scale) == (4, 2.0)


def test_without_the_tour_the_defaults_are_offline_tiny_ddim_p2p(hydra_conf):
    cfg = compose(config_name="run", overrides=["~experiment"], return_hydra_config=True)
    assert (cfg.model.name, cfg.editor.name, cfg.dataset.name, cfg.metrics.on_missing) == (
        "tiny", "ddim_p2p", "builtin", "warn")
    assert cfg.hydra.mode is None and cfg.editor.num_steps == 50


@pytest.mark.parametrize(("model", "default"), [
    *[(name, "bf16") for name in ("sd3", "sd35_medium", "sd35_large", "flux_dev", "flux_schnell", "sd3_arch",
                                  "flux_arch", "flux_kontext_dev", "flux_kontext_arch", "qwen_image_edit",
                                  "qwen_image_edit_2509", "qwen_image_edit_2511", "qwen_image_edit_lightning",
                                  "qwen_image_edit_2509_lightning", "qwen_image_edit_arch")],
    ("tiny_sd3", "fp32"), ("tiny_flux", "fp32"), ("tiny_flux_kontext", "fp32"),  # CPU tests: bf16 is emulated there
    ("tiny_qwen_image_edit", "fp32"),
])
def test_flow_transformer_models_choose_their_precision_and_the_command_line_wins(hydra_conf, model, default):
    assert compose(config_name="run", overrides=["~experiment", f"model={model}"]).precision.name == default
    cfg = compose(config_name="run", overrides=["~experiment", f"model={model}", "precision=fp16"])
    assert (cfg.precision.name, cfg.precision.vae_dtype) == ("fp16", "float32")
    if model.startswith(("qwen", "tiny_qwen")):  # the Qwen pipelines encode the reference in the compute dtype
        assert OmegaConf.to_container(cfg.model, resolve=True)["vae_dtype"] == "float16"


def test_model_configs_bring_their_editor_settings(hydra_conf):
    """The models' own sampling for the instruction editors (conf/editor_weights/<model>/<editor>.yaml), under the
    command line: the -2509 / -2511 cards' 40 steps, Lightning's 8 steps without CFG, the tiny Kontext's own-size
    reference."""
    def editor(*overrides):
        return compose(config_name="run", overrides=["~experiment", *overrides]).editor

    assert editor("model=qwen_image_edit", "editor=qwen_image_edit").num_steps == 50
    for model in ("qwen_image_edit_2509", "qwen_image_edit_2511"):
        assert editor(f"model={model}", "editor=qwen_image_edit").num_steps == 40
    lightning = editor("model=qwen_image_edit_2509_lightning", "editor=qwen_image_edit")
    assert (lightning.num_steps, lightning.true_cfg_scale) == (8, 1.0)
    assert editor("model=qwen_image_edit_lightning", "editor=qwen_image_edit", "editor.num_steps=4").num_steps == 4
    assert editor("model=tiny_flux_kontext", "editor=flux_kontext").auto_resize is False
    assert editor("model=flux_kontext_dev", "editor=flux_kontext").auto_resize is True
    model = compose(config_name="run", overrides=["~experiment", "model=qwen_image_edit_2509_lightning"]).model
    assert (model.path, model.pipeline, model.scheduler.shift_terminal) == ("Qwen/Qwen-Image-Edit-2509", "edit_plus",
                                                                          None)
    assert model.lora_weight_name.startswith("Qwen-Image-Edit-2509/") and "8steps" in model.lora_weight_name


def test_pie_bench_dataset_selects_the_reference_metrics(hydra_conf):
    cfg = compose(config_name="run", overrides=["~experiment", "dataset=pie_bench", "dataset.root=/data/PIE-Bench_v1"])
    assert cfg.metrics.structure.path == "facebook/dino-vitb8"
    assert cfg.metrics.clip.path == "openai/clip-vit-large-patch14" and cfg.metrics.lpips.net == "squeeze"
    assert cfg.metrics.on_missing == "error"


REFERENCE_P2P = {"cross_replace_steps": 0.4, "self_replace_steps": 0.6, "mode": "refine", "amplify": 2.0,
                 "amplify_words": "blend_word", "local_blend": True, "blend_start": 0.2, "blend_threshold": 0.3}


@pytest.mark.parametrize(("editor", "own"), [
    ("ddim_p2p", {}), ("npi", {}), ("direct_inversion", {}),
    ("null_text", {"num_inner_steps": 10, "learning_rate": 0.01, "early_stop_epsilon": 1e-5}),
])
def test_the_p2p_family_has_the_pie_bench_reference_settings(hydra_conf, editor, own):
    cfg = OmegaConf.to_container(compose(config_name="run", overrides=["~experiment", f"editor={editor}"]).editor)
    assert cfg == {"name": editor, "num_steps": 50, "guidance_scale": 7.5, **own, "p2p": REFERENCE_P2P}
    assert P2PSettings(**REFERENCE_P2P) == P2PSettings()  # the settings object's defaults are the reference's too


@pytest.mark.parametrize("option", [option for group, option in OPTIONS if group == "editor"])
def test_every_editor_config_maps_onto_its_constructor(hydra_conf, option):
    """Every key of conf/editor/<option>.yaml (composed, with its defaults) is a constructor argument of the class
    its name registers, of the annotated type and in range: the config tree is the constructor call."""
    cfg = OmegaConf.to_container(compose(config_name="run", overrides=["~experiment", f"editor={option}"]).editor,
                                 resolve=True)
    cls, arguments = editor_arguments(cfg)
    assert cls.name == cfg["name"] and arguments.keys() == cfg.keys() - {"name"}
