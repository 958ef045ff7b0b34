"""The same run on another mesh: a 1-device checkpoint restores onto 8 CPU devices ({data: 2, expert: 2, tensor: 2}) with
its values intact and sharded over the new mesh, and training continues with the 1-device continuation's losses; 8
devices from scratch train like 1 (up to float reduction order). The 8-device runs share one subprocess
(training_helpers.SharedRuns.eight_devices)."""

from __future__ import annotations

import numpy as np
from training_helpers import read_checkpoint_arrays

TOLERANCE = dict(rtol=1e-5, atol=1e-6)  # sums over tokens and the tensor axis are reduced in another order


def test_checkpoint_restores_onto_an_8_device_mesh_with_the_same_values(runs):
    one = runs.reference("loramoe")
    restored = runs.eight_devices()["restored"]
    assert restored["step"] == 6
    saved = read_checkpoint_arrays(one.checkpoints, 6)
    leaves = restored["leaves"]
    assert leaves.keys() == saved.keys()
    for name, (value, _, _) in leaves.items():
        np.testing.assert_array_equal(value, saved[name], err_msg=name)
    # Placed on the new mesh: experts over "expert", their moments alike, every leaf on all 8 devices.
    assert all(devices == 8 for _, _, devices in leaves.values())
    lora_a = "trainable/layers/mlp/up_proj/experts/lora_a/value"
    assert "expert" in leaves[lora_a][1]
    moments = [name for name in leaves if name.startswith("opt_state/") and name.endswith("up_proj/experts/lora_a/value")]
    assert len(moments) == 2 and all(leaves[m][1] == leaves[lora_a][1] for m in moments)


def test_training_resumed_on_8_devices_continues_like_1_device(runs):
    one = runs.reference("loramoe")
    resumed = runs.eight_devices()["resumed"]
    assert (resumed["step"], resumed["stop_reason"]) == (12, "completed")
    assert resumed["losses"][:6] == one.losses[:6]  # read back from the copied metrics
    np.testing.assert_allclose(resumed["losses"][6], one.losses[6], **TOLERANCE)  # the next step
    np.testing.assert_allclose(resumed["losses"][6:], one.losses[6:], **TOLERANCE)


def test_8_devices_train_like_1_device(runs):
    one = runs.reference("loramoe")
    scratch = runs.eight_devices()["scratch"]
    assert scratch["step"] == 12
    np.testing.assert_allclose(scratch["losses"], one.losses, **TOLERANCE)
    final_8 = read_checkpoint_arrays(scratch["output_dir"] / "checkpoints", 12)
    final_1 = read_checkpoint_arrays(one.checkpoints, 12)
    # Adam divides each gradient by its own root mean square, so a coordinate whose gradient is near zero turns a
    # reduction-order difference of 1e-7 into a step difference of up to the learning rate (0.01 here); single
    # coordinates differed by 6.4e-5 and 1.3e-4 in CI runs. Allow a hundredth of the 12 steps' largest possible
    # movement: a wrong gradient moves coordinates by about the learning rate every step, and the losses match to 1e-5.
    movement_bound = 0.01 * 12
    for name in final_1:
        np.testing.assert_allclose(final_8[name], final_1[name], rtol=1e-4, atol=1e-2 * movement_bound, err_msg=name)
