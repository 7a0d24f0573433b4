"""Export a reward checkpoint (or a training run's best) as an open_clip / Hugging Face model folder:
open_clip_model.safetensors (every weight), open_clip_config.json, a README.md model card, sr_ray_reward.json.

    sr-ray export checkpoint=runs/sr-reward-demo out=exported/sr-reward          # = python jobs/export.py ...
    python jobs/export.py checkpoint=s3://b/runs/sr/checkpoint_000009 out=exported/sr push_to_hub=org/name

Load it with open_clip.create_model_and_transforms("local-dir:exported/sr-reward") or RewardScorer("exported/sr-reward").
The last stdout line is JSON: {"out", "checkpoint", "run", "files", "params", "max_weight_difference", "hub", ...}.
"""

from sr_ray.app.registry import run


def main(argv=None) -> dict:
    return run("export", argv, __doc__)


if __name__ == "__main__":
    main()
