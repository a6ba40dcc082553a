"""Equal budgets (docs/methods.md §6): within a comparison family every experiment's default training budget
(optimiser, lr schedule, updates, batch, clipping) is the same at paper and at tiny scale; the only deviations
are listed here, each in a file that says why."""
from __future__ import annotations

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

import diffseg.drivers.cli  # noqa: F401 - registers the config resolvers

REPO = Path(__file__).resolve().parents[2]
FAMILIES = {
    "family_3d": (["unet_brats", "unet_sdn_brats", "imgx_brats", "segdiff_brats", "imgx_msd"], "brats_synthetic"),
    "family_2d": (["unet_folder2d", "unet_sdn_folder2d", "segdiff_folder2d", "segrefiner_folder2d"], "shapes2d"),
}
#: (experiment, scale) -> the budget keys it sets itself, and the file that says why
DEVIATIONS = {
    ("segdiff_brats", "tiny"): ({"max_steps", "lr"}, "experiments/sizes/experiment/segdiff_brats_tiny.yaml"),
    ("segdiff_folder2d", "tiny"): ({"max_steps"}, "experiments/sizes/experiment/segdiff_folder2d_tiny.yaml"),
}


def budget(experiment: str, data: str, scale: str) -> dict:
    with initialize_config_dir(config_dir=str(REPO / "experiments"), version_base="1.3"):
        cfg = compose("fit", overrides=[f"experiment={experiment}", f"data={data}", f"scale={scale}",
                                        "paths.output_dir=unused"])
    opt = cfg.model.optimizer
    return {"budget": cfg.budget_name, "optimizer": opt._target_, "lr": opt.lr, "weight_decay": opt.weight_decay,
            "schedule": OmegaConf.to_container(cfg.model.lr_schedule), "batch": cfg.data.batch_size,
            "max_steps": cfg.trainer.max_steps, "clip": cfg.trainer.gradient_clip_val}


@pytest.mark.parametrize("scale", ["paper", "tiny"])
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_a_family_shares_one_budget(family, scale):
    members, data = FAMILIES[family]
    budgets = {e: budget(e, data, scale) for e in members}
    reference = budgets[members[0]]
    assert reference["budget"] == family
    for experiment, b in budgets.items():
        allowed, why = DEVIATIONS.get((experiment, scale), (set(), None))
        differing = {k for k in b if b[k] != reference[k]}
        assert differing <= allowed, (experiment, {k: (b[k], reference[k]) for k in differing})
        if differing:
            assert "budget" in (REPO / why).read_text()  # the file says why it leaves the family's budget


def test_family_3d_paper_budget_is_the_imgx_reference_v010():
    b = budget("imgx_brats", "brats_synthetic", "paper")
    assert (b["lr"], b["weight_decay"], b["batch"], b["max_steps"], b["clip"]) == (1e-4, 1e-8, 8, 12500, 1.0)
    assert b["schedule"]["_target_"].endswith("warmup_cosine")
    assert (b["schedule"]["warmup_steps"], b["schedule"]["min_ratio"]) == (100, 0.01)  # floor 1e-6
    assert b["optimizer"] == "torch.optim.AdamW"
