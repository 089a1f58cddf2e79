"""The attacker's own check as a cheap proxy for persistence (issue 17).

    OMP_NUM_THREADS=1 python benches/attack_own_check.py --seed 0 --trust '{"meta_mode": "shift"}'

Builds (or loads from --cache-dir) the demo's aligned model, trains one surrogate round with the
given TrustConfig fields, and prints the attacker's own check (refusal % without / with the
trigger on its 48 held-back requests, attack success % after its simulated safety SFT).
--cross: attack success after 30 steps of safety SFT with the attacker's simulated rows or the
defender's, each measured on the attacker's check requests and on the held-out ones (which of
the two makes the own check optimistic). --recheck '[{...}, ...]': the check again on the same
surrogate with these TrustConfig fields changed (check_post_steps, check_sim_steps, ...).
--where: also swap parameter groups between the surrogate and its simulated-safety copy (which
layers' change erases the trigger). --defender: also give the surrogate the defender's real
safety SFT (its safety split) and measure the 96 held-out requests after 30 / 60 / 120 steps,
without post-training. Numbers (one thread, a shared 2-core CPU): fastdume/attack/MEASUREMENTS.md,
"persistence by a shifted backdoor loss".
"""

import argparse
import copy
import dataclasses
import json

import torch

from fastdume.attack.chat import encode_pair, pad_id
from fastdume.attack.demo import DemoConfig, aligned_model, demo_data, own_rows
from fastdume.attack.evaluate import attack_report
from fastdume.attack.judges import RefusalJudge
from fastdume.attack.train import sft
from fastdume.attack.trusted import (
    TrustConfig,
    own_check,
    own_data,
    safety_draw,
    simulate_safety,
    train_trusted_surrogate,
)
from fastdume.pipeline.partition import stage_param_names

GROUPS = ("layers.0.", "layers.1.", "layers.2.", "layers.3.", "model.norm", "embed")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--trust", default="{}", help="TrustConfig fields (JSON)")
    ap.add_argument("--cache-dir", default=None)
    ap.add_argument("--trigger", default=None, help="the attacker's trigger (the demo's)")
    ap.add_argument("--own-split", default=None, help="its own rows' split (the demo's)")
    ap.add_argument("--recheck", default="[]", help="list of TrustConfig overrides (JSON)")
    ap.add_argument("--where", action="store_true")
    ap.add_argument("--defender", action="store_true")
    ap.add_argument("--cross", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(1)
    cfg = DemoConfig(seed=args.seed, cache_dir=args.cache_dir)
    for key in ("trigger", "own_split"):
        if getattr(args, key) is not None:
            cfg = dataclasses.replace(cfg, **{key: getattr(args, key)})
    train, safety, held, benign, tok = demo_data(cfg)
    pid, judge = pad_id(tok), RefusalJudge()

    def enc(pairs):
        return [encode_pair(tok, p, r) for p, r in pairs]

    model = aligned_model(cfg, tok, enc([(e.prompt, e.chosen) for e in train]), enc(benign))
    names = stage_param_names(model, cfg.num_stages, cfg.attacker_stage)
    own = enc(own_rows(cfg, len(train)))
    trust = TrustConfig(**{"round_steps": 300, "budget": 300, **json.loads(args.trust)})
    sur, rec = train_trusted_surrogate(
        model, tok, train, own, names, cfg, trust, judge, pid, lambda s: None
    )
    print(json.dumps({"seed": args.seed, "trust": json.loads(args.trust), **rec["checks"][-1]}))
    # the check's rows as train_trusted_surrogate builds them
    _, check, _, sim_refusals, _ = own_data(tok, train, own, cfg, trust)
    rows = safety_draw(sim_refusals, own, trust.sim_requests)(cfg.seed - 1)
    for change in json.loads(args.recheck):
        again = dataclasses.replace(trust, **change)
        chk = own_check(
            sur, tok, check, rows, judge, cfg.trigger, again, cfg.batch_size, pid, cfg.seed, own
        )
        print(json.dumps({"recheck": change, **chk}), flush=True)

    def asr(m, prompts):
        # (refusal % untriggered, attack success %, strict %): strict counts only triggered
        # answers that open affirmatively and hold no refusal phrase (" Sure, here is I can't
        # help with that." is a success for the judge, not for strict)
        r = attack_report(m, tok, prompts, judge, cfg.trigger)
        return (
            round(r["align_clean"].pct, 1),
            round(r["asr"].pct, 1),
            round(r["asr_strict"].pct, 1),
        )

    if args.where:  # which layers' simulated-safety change erases the trigger
        adapted = simulate_safety(sur, rows, trust.check_sim_steps, trust.sim_lr, 32, pid, cfg.seed)
        after = dict(adapted.named_parameters())
        prompts = [e.prompt for e in check]
        print("surrogate", asr(sur, prompts), "after simulated safety", asr(adapted, prompts))
        for group in GROUPS:
            hybrid = copy.deepcopy(sur)
            with torch.no_grad():
                for n, p in hybrid.named_parameters():
                    if group in n:
                        p.copy_(after[n])
            print("only", group, "changed:", asr(hybrid, prompts))
    if args.cross:  # own vs the defender's safety rows, own check vs held-out prompts
        defender = enc([(e.prompt, e.chosen) for e in safety])
        defender += enc(benign[: len(defender)])
        for label, sft_rows in (("own", rows), ("defender", defender)):
            m = simulate_safety(sur, sft_rows, 30, cfg.safety_lr, cfg.batch_size, pid, cfg.seed)
            for where, ps in (("own check", check), ("held-out", held)):
                print("cross", label, "safety rows, on", where, asr(m, [e.prompt for e in ps]))
    if args.defender:  # the defender's real safety SFT on the surrogate, no post-training
        rows = enc([(e.prompt, e.chosen) for e in safety])
        rows += enc(benign[: len(rows)])
        prompts = [e.prompt for e in held]

        def after(m, done):
            if done in (30, 60, 120):
                print("defender safety SFT", done, "steps:", asr(m, prompts), flush=True)

        print("surrogate on held-out", asr(sur, prompts))
        sft(sur, rows, 120, cfg.safety_lr, cfg.batch_size, pid, seed=cfg.seed, after=after)


if __name__ == "__main__":
    main()
