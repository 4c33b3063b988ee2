"""forge transfer --whiten: maps estimated on whitened coordinates, exact on re-parameterisations."""

from __future__ import annotations

import torch

from llmforge.checkpoint import load_task_vector
from llmforge_transfer.align import procrustes_near_identity, whitened_cross
from llmforge_transfer.calibration import CalibrationSettings
from llmforge_transfer.transfer import TRANSPORTED_VECTOR, TransferRequest, run_transfer
import test_transfer_reparam
from test_transfer_reparam import _relative_error

calib_file = test_transfer_reparam.calib_file
rotated_pair = test_transfer_reparam.rotated_pair


def _statistics(target_rows, source_rows):
    return target_rows.T @ source_rows, target_rows.T @ target_rows, source_rows.T @ source_rows


def test_whitened_map_recovers_skewed_rotation():
    generator = torch.Generator().manual_seed(0)
    # Variances 900, 100 and 0.01: a ratio of 9e4, as between outlier and ordinary residual coordinates.
    scales = torch.tensor([30.0, 10.0] + [0.1] * 6, dtype=torch.float64)
    source = torch.randn(500, 8, generator=generator, dtype=torch.float64) * scales
    rotation, _ = torch.linalg.qr(torch.randn(8, 8, generator=generator, dtype=torch.float64))

    cross, auto_target, auto_source = _statistics(source @ rotation.T, source)
    q, _ = procrustes_near_identity(whitened_cross(cross, auto_target, auto_source))

    torch.testing.assert_close(q, rotation, rtol=0, atol=1e-5)


def test_undetermined_directions_stay_in_place():
    # The rows of two identical models span only 3 of 8 directions. Plain Procrustes may rotate the
    # other 5 freely, but the whitened map leaves them in place.
    generator = torch.Generator().manual_seed(1)
    rows = torch.randn(200, 3, generator=generator, dtype=torch.float64) @ torch.randn(3, 8, generator=generator,
                                                                                          dtype=torch.float64)
    cross, auto_target, auto_source = _statistics(rows, rows)

    q, _ = procrustes_near_identity(whitened_cross(cross, auto_target, auto_source))

    torch.testing.assert_close(q, torch.eye(8, dtype=torch.float64), rtol=0, atol=1e-6)


def test_whitened_bico_exact_vector(rotated_pair, calib_file, tmp_path):
    source_dir, target_dir, vector_file, exact = rotated_pair
    settings = CalibrationSettings(calib_tokens=3000, dtype="float64", batch_size=8, whiten=True)
    request = TransferRequest(source_base=str(source_dir), target_base=str(target_dir), calib=str(calib_file),
                              output=tmp_path / "out", vector=str(vector_file), align="bico", settings=settings)
    record = run_transfer(request, command=["test"])

    transported, _ = load_task_vector(tmp_path / "out" / TRANSPORTED_VECTOR)
    assert _relative_error(transported, exact) < 1e-4
    assert record["calibration"]["whiten"] is True
