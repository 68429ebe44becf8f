"""KleinRepeatsCalculator against ComfyUI's real node API.

Runs only where ``comfy_api`` is importable (skipped otherwise, never faked). tests/test_comfy_server.py runs this
file inside the real ComfyUI's own venv, so CI always executes it; the plain test interpreter skips it.
"""

from __future__ import annotations

import asyncio

import pytest
from harness.comfyui import import_pack, import_pack_module, require_comfy_api


@pytest.fixture(scope="module")
def calculator():
    require_comfy_api()
    return import_pack_module("nodes.calculator_node").KleinRepeatsCalculator


@pytest.fixture(scope="module")
def pack_core():
    """The pack's own copy of klein_core (imported relatively, as inside ComfyUI)."""
    require_comfy_api()
    return import_pack_module("klein_core.train.planner"), import_pack_module("klein_core.preset").PRESET


def test_seed_example_with_grad_accum_4_plans_1375_training_steps(calculator):
    output = calculator.execute(images=55, target_repeats=100, batch_size=1, grad_accum=4)
    training_steps, summary = output.result
    assert training_steps == 1375
    assert "training steps: 1375" in summary
    assert "repeats per image: 100.0" in summary


def test_summary_is_shown_on_the_node(calculator):
    output = calculator.execute(images=55, target_repeats=100, batch_size=1, grad_accum=1)
    _, summary = output.result
    assert output.ui.as_dict() == {"text": (summary,)}


def test_changing_grad_accum_changes_training_steps_but_not_the_dose(calculator, pack_core):
    planner, _ = pack_core
    for grad_accum in (1, 2, 4, 8):
        training_steps, _ = calculator.execute(
            images=55, target_repeats=100, batch_size=1, grad_accum=grad_accum
        ).result
        assert training_steps == planner.plan(55, 100, 1, grad_accum).training_steps
        assert planner.repeats_per_image_for(training_steps, 55, 1, grad_accum) >= 100
    assert calculator.execute(images=55, target_repeats=100, batch_size=1, grad_accum=1).result[0] == 5500


def test_a_linked_bad_value_fails_with_an_error_naming_it(calculator):
    # Linked values bypass the widgets' min checks, so the planner's own error must reach the user.
    with pytest.raises(ValueError, match="grad_accum"):
        calculator.execute(images=55, target_repeats=100, batch_size=1, grad_accum=0)
    with pytest.raises(ValueError, match="images"):
        calculator.execute(images=0, target_repeats=100, batch_size=1, grad_accum=1)


def test_every_input_tooltip_quotes_the_formula_and_defaults_come_from_the_preset(calculator, pack_core):
    _, preset = pack_core
    schema = calculator.define_schema()
    assert schema.node_id.startswith("Klein")
    assert schema.category.startswith("Klein LoRA/")
    formula = "repeats_per_image = S*B*G/N; S = ceil(N*R/(B*G))"
    plan_inputs = ["images", "target_repeats", "batch_size", "grad_accum"]
    assert [item.id for item in schema.inputs][:4] == plan_inputs
    for item in schema.inputs:
        assert item.tooltip, item.id
        if item.id in plan_inputs:
            assert formula in item.tooltip, item.id
    defaults = {item.id: item.default for item in schema.inputs}
    assert defaults["target_repeats"] == preset.target_repeats
    assert defaults["batch_size"] == preset.batch_size
    assert defaults["grad_accum"] == preset.grad_accum
    assert [item.id for item in schema.outputs] == ["training_steps", "summary"]
    assert all(item.tooltip for item in schema.outputs)


def test_entry_point_is_v3_and_lists_the_calculator(calculator):
    pack = import_pack()
    # NODE_CLASS_MAPPINGS would make ComfyUI take the V1 route and silently ignore comfy_entrypoint.
    assert not hasattr(pack, "NODE_CLASS_MAPPINGS")
    assert pack.WEB_DIRECTORY == "./web"
    extension = asyncio.run(pack.comfy_entrypoint())
    node_list = asyncio.run(extension.get_node_list())
    assert calculator in node_list
