"""The worked example of the packed layout in iceaggr_lib.collate's docstring, checked literally."""

import numpy as np
import torch

from iceaggr_lib.collate import collate_events


def test_docstring_example_layout():
    events = [
        dict(event_id=5, sensor_id=np.array([17, 40, 17, 52, 17]), time=np.array([3.0, 1, 1, 2, 2]),
             charge=np.ones(5), auxiliary=np.zeros(5, bool)),
        dict(event_id=9, sensor_id=np.array([33, 17, 33, 90]), time=np.array([2.0, 1, 1, 0]),
             charge=np.ones(4), auxiliary=np.zeros(4, bool)),
    ]
    batch = collate_events(events, sensor_xyz=np.random.default_rng(0).random((100, 3)))
    assert batch.cu_seqlens.tolist() == [0, 3, 4, 5, 6, 8, 9]
    assert batch.cu_seqlens.dtype == torch.int32
    assert batch.pulse_to_dom_idx.tolist() == [0, 0, 0, 1, 2, 3, 4, 4, 5]
    assert batch.dom_pulse_counts.tolist() == [3, 1, 1, 1, 2, 1]
    assert batch.dom_ids.tolist() == [17, 40, 52, 17, 33, 90]
    assert batch.dom_to_event_idx.tolist() == [0, 0, 0, 1, 1, 1]
    assert batch.event_dom_counts.tolist() == [3, 3]
    assert batch.event_ids.tolist() == [5, 9]
    assert batch.max_dom_pulses == 3
    # time sorted within each DOM
    t = batch.pulse_features[:, 3].numpy()
    assert all(np.all(np.diff(t[s:e]) >= 0) for s, e in zip(batch.cu_seqlens[:-1].tolist(), batch.cu_seqlens[1:].tolist()))
