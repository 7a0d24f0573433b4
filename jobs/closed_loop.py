"""The paper's loop in miniature, from nothing: a pre-trained tiny generator draws several images per community
prompt, the community's reward model ranks them, the best of each (the paper also takes the worst, with the
special token: select.worst=true) and as many regularization pictures fine-tune the generator, and the
fine-tuned model is evaluated against the baseline on held-out community prompts and a general set (Tables 5-6
with bootstrap intervals, image grids).

    python jobs/closed_loop.py                                   # embedded default (2 cores: 11 min from nothing, 5 cached)
    python jobs/closed_loop.py selection=random out=./runs/closed-loop-random   # the ablation: random picks
    python jobs/closed_loop.py seed=1 out=./runs/closed-loop-s1 finetune.optim.max_steps=300

Every stage is kept in <out> (prompts/, generations/, scores/, finetune-set/, finetuned/, eval/) and skipped
when already there. The last stdout line is JSON (stage_s: seconds per stage; social_reward_win_rate).
"""

from sr_ray.app.registry import run


def main(argv=None) -> dict:
    return run("closed_loop", argv, __doc__)


if __name__ == "__main__":
    main()
