"""The pipeline's actor pools (``ase_ray.features.pipeline.stage_groups``) in its three layouts."""

from pathlib import Path

from ase_ray.config import load_config
from ase_ray.features.pipeline import stage_groups


def names(groups):
    return [(["decode"] if decodes else []) + [cls.name for cls, _ in stages] for stages, decodes, _ in groups]


def test_one_pool_runs_every_stage_sized_like_the_llm_and_asking_for_its_largest_step():
    cfg = load_config(overrides=["features.reason.resources.actors=3", "features.reason.resources.batch_size=6",
                                 "features.ocr.resources.num_cpus=0.7"])
    assert cfg.features.fuse_all_stages  # the embedded default
    (stages, decodes, res), = stage_groups(cfg)
    assert names(stage_groups(cfg)) == [["decode", "ocr", "describe", "image_encoder", "reason", "text_encoder"]]
    # its steps run one after another in the actor: the most one of them asks for, not their sum
    assert (res.actors, res.batch_size, res.num_cpus, res.num_gpus) == (3, 6, 0.7, 0)


def test_two_pools_with_fuse_cpu_stages_and_a_pool_per_stage_without():
    two = load_config(overrides=["features.fuse_all_stages=false"])
    assert names(stage_groups(two)) == [["decode", "ocr", "describe", "image_encoder"], ["reason", "text_encoder"]]
    six = load_config(overrides=["features.fuse_all_stages=false", "features.fuse_cpu_stages=false"])
    assert names(stage_groups(six)) == [["decode"], ["ocr"], ["describe"], ["image_encoder"], ["reason"],
                                        ["text_encoder"]]


def test_the_cluster_config_keeps_a_pool_per_stage():
    cluster = load_config(Path(__file__).resolve().parents[2] / "configs" / "cluster.yaml")
    assert len(stage_groups(cluster)) == 6


def test_input_blocks_share_the_manifest_schema_when_a_column_is_empty_in_one_block():
    import numpy as np
    import pandas as pd

    from ase_ray.features.pipeline import _with_row_ids, input_blocks

    # TDA's manifest: source_image is missing for the original images, a path for the drawn ones.
    rows = _with_row_ids(pd.DataFrame({
        "image_path": [f"/d/{i}.png" for i in range(6)], "probe_reading": [0.5, np.nan, 1.5, 2.0, np.nan, 3.0],
        "source_image": [np.nan, np.nan, np.nan, "/d/0.png", "/d/1.png", np.nan],
    }))
    blocks = input_blocks(rows, [3, 3])
    assert [b.num_rows for b in blocks] == [3, 3]
    assert blocks[0].schema == blocks[1].schema
    assert blocks[0].schema.field("source_image").type == blocks[1].schema.field("source_image").type
    assert str(blocks[1].schema.field("source_image").type) in ("string", "large_string")
    assert blocks[0].column("source_image").null_count == 3
    assert blocks[1].column("source_image").to_pylist()[:2] == ["/d/0.png", "/d/1.png"]


def test_the_last_round_of_input_blocks_is_split_evenly_over_the_actors():
    from ase_ray.features.pipeline import block_sizes

    # 45 batches of 8 on 2 actors: the 45th would run alone; its rows go to both actors instead
    assert block_sizes(360, 8, 2) == [8] * 44 + [4, 4]
    assert block_sizes(352, 8, 2) == [8] * 44  # whole rounds stay whole
    assert block_sizes(17, 8, 3) == [6, 6, 5]
    assert block_sizes(2, 8, 3) == [1, 1]  # never an empty block
    assert block_sizes(0, 8, 2) == [0]
    assert all(sum(block_sizes(n, 8, 2)) == n for n in range(1, 100))
