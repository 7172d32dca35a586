"""Does the encoder learn? The paper's comparison, same compute for every arm, measured the paper's way.

    python -m bench.learning [--profile cpu|gpu|smoke] [--branch animals --branch food ...] [--seeds 0,1]

For each target (a Tux Paint branch of the offline web, `make data`) and seed, five arms start
from the same ImageNet-pretrained encoder:

  (a) init      the initial encoder, untrained;
  (b) target    self-supervised training (MoCo-v3) on the target's train images alone;
  (c) random    target + web images drawn uniformly from the offline web, as many per round as (d) found;
  (d) ie        Internet Explorer without labels: plan (GP over WordNet) -> search -> reward -> train;
  (e) labels    Internet Explorer with the target's class names guiding the vocabulary.

Every trained arm takes the same number of optimisation steps of the same batch size, round by
round (rounds x steps per round), so only the choice of web images differs. Evaluation is the
paper's protocol: k-NN (memory bank = the labelled train split) and a linear probe fitted on the
train split, both scored on the test split (eval/, never trained on), paired against (a) on the
same test images with a bootstrap 95% interval pooled over seeds. The label-free signal is the
ROC AUC of the image reward (k = 15 nearest target images) against the corpus's relevance ground
truth on a fixed sample of web images, per encoder version. Curves: accuracy after every round.

Writes bench/results/learning.json (or learning-<profile>.json for non-default profiles) and prints
one table per target. See bench/README.md for the measured figures.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import json
import os
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from bench.learning import explore
from services.common.images import square_pixels
from services.offlineweb import targets as target_sets
from services.offlineweb.build import default_data_dir
from services.planner import planning
from services.trainer import evaluation, initialisation
from services.trainer.encoder import EncoderState, ModelConfig
from services.trainer.loader import TensorLoader
from services.trainer.training import TrainConfig, train

REPO = Path(__file__).resolve().parents[2]
RESULTS = REPO / "bench" / "results"
ARMS = ("init", "target", "random", "ie", "labels")
TRAINED = ARMS[1:]
MAX_PIXELS = 64_000_000


@dataclass(frozen=True)
class Profile:
    name: str
    backbone: str = "tf_efficientnet_lite0"
    init: str = "efficientnet-lite0"
    image_size: int = 64
    batch_size: int = 32
    rounds: int = 4
    steps_per_round: int = 50
    queries_per_round: int = 64
    images_per_query: int = 16
    base_lr: float = 2.4
    warmup_steps: int = 10
    momentum: float = 0.99
    batchnorm: str = "frozen"
    mlp_dim: int = 1024
    precision: str = "fp32"
    device: str = "cpu"
    auc_sample: int = 1500
    replay_ratio: float = 2.0


PROFILES = {
    # 2 CPU cores: EfficientNet-Lite0 at 32 px, 3 rounds of 10 steps (bench/README.md says why so few).
    "cpu": Profile("cpu", image_size=32, rounds=3, steps_per_round=10, queries_per_round=48, base_lr=0.6),
    # One H100/H200 (bench/gpu/learning_gpu.sh): 224 px, bf16, the paper's batch; sized for ~9 minutes
    # over 3 targets x 2 seeds (estimated: not yet run on a GPU), results written after each target.
    "gpu": Profile("gpu", image_size=224, batch_size=224, rounds=3, steps_per_round=50, queries_per_round=96, images_per_query=16, base_lr=0.6, precision="bf16", device="cuda", auc_sample=3000),
    # Seconds: checks the whole path (CI, and before spending a GPU).
    "smoke": Profile("smoke", image_size=32, batch_size=8, rounds=2, steps_per_round=2, queries_per_round=4, images_per_query=4, warmup_steps=2, auc_sample=60),
}


# ---------------------------------------------------------------------------------------------
# Data


class Pixels:
    """Decoded squares of image files, cached (a web image is decoded once per size)."""

    def __init__(self) -> None:
        self.cache: dict[tuple[str, int], np.ndarray] = {}

    def get(self, path: Path, size: int) -> np.ndarray:
        key = (str(path), size)
        if key not in self.cache:
            self.cache[key] = square_pixels(path.read_bytes(), size, max_pixels=MAX_PIXELS)
        return self.cache[key]

    def batch(self, paths: list[Path], size: int) -> torch.Tensor:
        return explore.to_tensor([self.get(p, size) for p in paths])


@dataclass
class TargetData:
    branch: str
    directory: Path
    target: target_sets.Target
    train_paths: list[Path]  # every train image (self-supervised training)
    labelled_paths: list[Path]  # labelled train images (k-NN bank, probe fit)
    labelled: list[str]
    test_paths: list[Path]
    test_labels: list[str]
    class_names: list[str]

    @classmethod
    def load(cls, data_dir: Path, branch: str) -> "TargetData":
        directory = target_sets.target_dir(data_dir, branch)
        if not (directory / target_sets.TRAIN_LABELS_FILE).is_file():
            raise SystemExit(f"{directory}: no {target_sets.TRAIN_LABELS_FILE}; run `make data`")
        labels = json.loads((directory / target_sets.TRAIN_LABELS_FILE).read_text())["labels"]
        test_paths = sorted(directory.glob("eval/*/*"))
        labelled = sorted(labels)
        names = sorted(set(labels.values()) | {p.parent.name for p in test_paths})
        return cls(
            branch=branch,
            directory=directory,
            target=target_sets.Target.load(directory),
            train_paths=sorted((directory / "train").glob("*")),
            labelled_paths=[directory / k for k in labelled],
            labelled=[labels[k] for k in labelled],
            test_paths=test_paths,
            test_labels=[p.parent.name for p in test_paths],
            class_names=names,
        )


class Evaluator:
    def __init__(self, data: TargetData, pixels: Pixels, size: int, device: torch.device) -> None:
        index = {c: i for i, c in enumerate(data.class_names)}
        self.train_x = pixels.batch(data.labelled_paths, size)
        self.test_x = pixels.batch(data.test_paths, size)
        self.train_y = torch.tensor([index[c] for c in data.labelled])
        self.test_y = torch.tensor([index[c] for c in data.test_labels])
        self.device = device

    def __call__(self, state: EncoderState) -> evaluation.SplitScores:
        embed = lambda x: evaluation.embed(state.backbone, x, state.config.mean, state.config.std, self.device)  # noqa: E731
        return evaluation.score_splits(embed(self.train_x), self.train_y, embed(self.test_x), self.test_y)


def embed_images(state: EncoderState, images: torch.Tensor, device: torch.device) -> np.ndarray:
    return evaluation.embed(state.backbone, images, state.config.mean, state.config.std, device).numpy()


# ---------------------------------------------------------------------------------------------
# The offline web: corpus, caption search, vocabulary


class OfflineWeb:
    def __init__(self, data_dir: Path) -> None:
        from services.search.corpus import load_corpus
        from services.search.index import build_caption_index
        from services.search.index_store import LocalIndexStore
        from services.common.textembed import shared_minilm

        self.root = data_dir
        self.corpus = load_corpus(data_dir)
        self.records = list(self.corpus.records)
        self.row_of = {r.id: i for i, r in enumerate(self.records)}
        self.embedder = shared_minilm()
        started = time.perf_counter()
        self.index = build_caption_index("offline-web", self.corpus, self.embedder, LocalIndexStore(data_dir / ".iex-index"), progress=print)
        print(f"  caption index ready in {time.perf_counter() - started:.0f} s ({len(self.records):,} images)", flush=True)

    def path(self, row: int) -> Path:
        return self.corpus.path_of(self.records[row])

    def search(self, texts: list[str], k: int) -> list[list[int]]:
        vectors = self.embedder.embed(texts)
        out = []
        for vector in vectors:
            matches = self.index.search(np.asarray(vector, dtype=np.float32), k)
            out.append([self.row_of[m.record.id] for m in matches if m.record.id in self.row_of])
        return out

    def relevant(self, target: target_sets.Target) -> np.ndarray:
        return np.array([target_sets.relevant(r.synset, target) for r in self.records], dtype=bool)


def vocabulary_pool(kind: str, web: "OfflineWeb", concept_text: str = ""):
    """The paper's WordNet nouns, embedded as `concept_text` (default: the planner's), or (`corpus`,
    for smoke runs) the offline web's own concept names: a vocabulary that every query can hit, far
    smaller to embed."""
    from services.planner.vocabulary import PROJECT_CONCEPT_TEXT, EmbeddingCache, custom_vocabulary, wordnet_vocabulary

    if kind == "corpus":
        vocabulary = custom_vocabulary(sorted({r.concept for r in web.records if getattr(r, "concept", "")}))
    else:
        vocabulary = wordnet_vocabulary(concept_text=concept_text or PROJECT_CONCEPT_TEXT)
    started = time.perf_counter()
    embeddings = EmbeddingCache(None, "").get(vocabulary)
    print(f"  vocabulary: {len(vocabulary):,} {'WordNet noun' if kind == 'wordnet' else 'corpus'} concepts embedded ({time.perf_counter() - started:.0f} s, cached)", flush=True)
    return vocabulary, embeddings


def label_pool(vocabulary, embeddings: np.ndarray, class_names: list[str], embedder) -> planning.Pool:
    # "mammals-bovines" -> "bovines": the most specific folder name is the class's name.
    labels = sorted({name.split("-")[-1].replace("_", " ") for name in class_names})
    return planning.label_guided_pool(vocabulary, embeddings, labels, np.asarray(embedder.embed(labels), dtype=np.float32))


# ---------------------------------------------------------------------------------------------
# Arms


def initial_state(profile: Profile, device: torch.device, seed: int) -> EncoderState:
    config = ModelConfig(backbone=profile.backbone, image_size=profile.image_size, init=profile.init, seed=seed, mlp_dim=profile.mlp_dim)
    weights = initialisation.resolve(profile.init, profile.backbone, None)
    return EncoderState.create(config, device, initial=weights)


def train_config(profile: Profile) -> TrainConfig:
    return TrainConfig(
        batch_size=profile.batch_size,
        base_lr=profile.base_lr,
        schedule="exploration",
        warmup_steps=profile.warmup_steps,
        epochs=1_000_000,
        max_steps=profile.steps_per_round,
        base_momentum=profile.momentum,
        early_stop_patience=0,
        batchnorm=profile.batchnorm,
        precision=profile.precision,
    )


@dataclass
class ArmRun:
    arm: str
    seed: int
    scores: evaluation.SplitScores
    curve: list[dict]
    steps: int
    images_seen: int
    distinct_web_images: int
    seconds: float
    rounds: list[dict]
    state: EncoderState | None = None


def run_arm(
    arm: str,
    seed: int,
    profile: Profile,
    data: TargetData,
    web: OfflineWeb,
    relevant: np.ndarray,  # per corpus row, the ground truth: read only to count each round's yield
    pixels: Pixels,
    evaluate: Evaluator,
    pools: dict[str, planning.Pool],
    reward_model: planning.RewardModel,
    device: torch.device,
    per_round_new: list[int] | None = None,
) -> ArmRun:
    started = time.perf_counter()
    state = initial_state(profile, device, seed)
    config = train_config(profile)
    decode = int(round(profile.image_size * 8 / 7))
    rng = random.Random(f"{seed}-{arm}")
    target_rows = [-(i + 1) for i in range(len(data.train_paths))]  # negative: target images

    def image(row: int) -> np.ndarray:
        return pixels.get(data.train_paths[-row - 1] if row < 0 else web.path(row), decode)

    bank_pixels = pixels.batch(data.train_paths, profile.image_size)

    def embed_rows(rows: list[int]) -> np.ndarray:
        return embed_images(state, explore.to_tensor([pixels.get(web.path(r), profile.image_size) for r in rows]), device)

    explorer = None
    if arm in ("ie", "labels"):
        explorer = explore.Explorer("labels" if arm == "labels" else "ie", pools[arm], web.search, profile.queries_per_round, profile.images_per_query, seed, reward_model)
    unseen = list(range(len(web.records)))
    rng.shuffle(unseen)
    random_replay: list[int] = []
    curve, rounds, seen_web = [], [], set()
    images_seen = 0
    for round_index in range(profile.rounds):
        if arm == "target":
            rows = rng.choices(target_rows, k=max(len(target_rows), profile.batch_size))
            log = {}
        elif explorer is not None:
            bank = embed_images(state, bank_pixels, device)
            new = explorer.collect(embed_rows, bank)
            rows = explore.training_rows(new, explorer.replay + target_rows, profile.replay_ratio, rng)
            last = explorer.log[-1]
            log = {"queries": last.queries, "hits": last.hits, "new_images": last.new_images, "mean_concept_reward": round(last.mean_concept_reward, 4), "top_concepts": last.top_concepts}
            log["new_relevant"] = int(relevant[new].sum())
        else:  # random: as many new web images as ie found in the same round
            count = per_round_new[round_index] if per_round_new else profile.queries_per_round * profile.images_per_query // 2
            new, unseen = unseen[:count], unseen[count:]
            random_replay.extend(rng.sample(new, len(new) // 2))
            rows = explore.training_rows(new, random_replay + target_rows, profile.replay_ratio, rng)
            log = {"new_images": len(new), "new_relevant": int(relevant[new].sum())}
        seen_web.update(r for r in rows if r >= 0)
        decode_started = time.perf_counter()
        loader = TensorLoader(explore.to_tensor([image(r) for r in rows]), profile.batch_size, seed=seed * 1000 + round_index)
        log["decode_s"] = round(time.perf_counter() - decode_started, 1)
        result = train(state, loader, config, seed=seed * 1000 + round_index)
        images_seen += result.steps * loader.global_batch
        log.update({"round": round_index + 1, "training_images": len(rows), "steps": result.steps, "loss": round(result.final_loss, 4)})
        scores = evaluate(state)
        curve.append({"steps": state.global_step, "knn_top1": scores.knn_top1, "probe_top1": scores.probe_top1})
        rounds.append(log)
        print(f"    {arm:7s} seed {seed} round {round_index + 1}: {result.steps} steps, loss {result.final_loss:.3f}, k-NN {scores.knn_top1:.3f}, probe {scores.probe_top1:.3f}" + (f", {log.get('new_relevant')}/{log.get('new_images')} new relevant" if "new_images" in log else ""), flush=True)
    return ArmRun(arm, seed, scores, curve, state.global_step, images_seen, len(seen_web), time.perf_counter() - started, rounds, state)


# ---------------------------------------------------------------------------------------------
# Summaries


def interval_json(found: evaluation.Interval) -> dict:
    return {**found.to_dict(), "excludes_zero": found.excludes_zero}


def interval(before: list[torch.Tensor], after: list[torch.Tensor]) -> dict:
    return interval_json(evaluation.paired_bootstrap(torch.stack(before), torch.stack(after)))


def summarise_target(data: TargetData, runs: dict[str, list[ArmRun]], initial: evaluation.SplitScores, aucs: dict, profile: Profile) -> dict:
    measure = evaluation.measurability(data.labelled, data.test_labels)
    out: dict = {
        "branch": data.branch,
        "train_images": len(data.train_paths),
        "labelled_train_images": len(data.labelled_paths),
        "test_images": len(data.test_paths),
        "classes": data.class_names,
        "measurable": measure.measurable,
        "not_measurable_reason": measure.reason,
        "detectable_difference": round(measure.detectable_difference, 4),
        "init": {"knn_top1": initial.knn_top1, "probe_top1": initial.probe_top1},
        "arms": {},
        "reward_auc": aucs,
    }
    for arm, arm_runs in runs.items():
        seeds = len(arm_runs)
        entry = {
            "seeds": [
                {"seed": r.seed, "knn_top1": r.scores.knn_top1, "probe_top1": r.scores.probe_top1, "curve": r.curve, "rounds": r.rounds, "seconds": round(r.seconds, 1)}
                for r in arm_runs
            ],
            "knn_top1_mean": float(np.mean([r.scores.knn_top1 for r in arm_runs])),
            "probe_top1_mean": float(np.mean([r.scores.probe_top1 for r in arm_runs])),
            "compute": {"steps": arm_runs[0].steps, "batch_size": profile.batch_size, "images_seen": arm_runs[0].images_seen, "distinct_web_images": [r.distinct_web_images for r in arm_runs]},
        }
        for metric, attr in (("knn", "knn_correct"), ("probe", "probe_correct")):
            entry[f"{metric}_minus_init"] = interval([getattr(initial, attr)] * seeds, [getattr(r.scores, attr) for r in arm_runs])
        out["arms"][arm] = entry
    for a, b in (("ie", "random"), ("ie", "target"), ("labels", "random")):
        if a in runs and b in runs:
            for metric, attr in (("knn", "knn_correct"), ("probe", "probe_correct")):
                out[f"{a}_minus_{b}_{metric}"] = interval([getattr(r.scores, attr) for r in runs[b]], [getattr(r.scores, attr) for r in runs[a]])
    if measure.measurable and "ie" in runs:
        ie = out["arms"]["ie"]
        out["goal"] = {
            "ie_beats_init_knn": ie["knn_minus_init"]["low"] > 0,
            "ie_beats_init_probe": ie["probe_minus_init"]["low"] > 0,
            "ie_at_least_random_knn": ie["knn_top1_mean"] >= out["arms"].get("random", ie)["knn_top1_mean"],
            "ie_at_least_random_probe": ie["probe_top1_mean"] >= out["arms"].get("random", ie)["probe_top1_mean"],
        }
    else:
        out["goal"] = "not measurable" if not measure.measurable else "ie arm not run"
    return out


def print_table(summary: dict) -> None:
    print(f"\n  {summary['branch']}: {summary['test_images']} test images, {len(summary['classes'])} classes, detectable difference {summary['detectable_difference']:.3f}" + ("" if summary["measurable"] else f" - NOT MEASURABLE: {summary['not_measurable_reason']}"))
    print(f"  {'arm':8s} {'k-NN':>6s} {'probe':>6s}   {'k-NN - init [95% CI]':>26s}   {'probe - init [95% CI]':>26s}")
    print(f"  {'init':8s} {summary['init']['knn_top1']:6.3f} {summary['init']['probe_top1']:6.3f}")
    for arm, entry in summary["arms"].items():
        k, p = entry["knn_minus_init"], entry["probe_minus_init"]
        print(f"  {arm:8s} {entry['knn_top1_mean']:6.3f} {entry['probe_top1_mean']:6.3f}   {k['mean']:+.3f} [{k['low']:+.3f}, {k['high']:+.3f}]   {p['mean']:+.3f} [{p['low']:+.3f}, {p['high']:+.3f}]")
    for key in ("ie_minus_random_knn", "ie_minus_random_probe"):
        if key in summary:
            v = summary[key]
            print(f"  {key}: {v['mean']:+.3f} [{v['low']:+.3f}, {v['high']:+.3f}]")
    aucs = summary["reward_auc"]
    print(f"  reward AUC ({aucs.get('sample', {}).get('images', '?')} web images): init {aucs.get('init')}")
    for arm, change in aucs.get("minus_init", {}).items():
        print(f"    {arm:8s} {np.mean(aucs[arm]):.3f}   AUC - init {change['mean']:+.3f} [{change['low']:+.3f}, {change['high']:+.3f}]")


def machine() -> str:
    try:
        model = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("model name"))
    except (OSError, StopIteration):
        model = "unknown CPU"
    gpu = f", {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else ""
    return f"{model}, {os.cpu_count()} cores{gpu}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.learning", description=__doc__.split("\n\n")[0])
    parser.add_argument("--profile", choices=sorted(PROFILES), default="cpu")
    parser.add_argument("--branch", action="append", help="Tux Paint branch (repeatable; default animals, food, plants)")
    parser.add_argument("--seeds", default="0,1")
    parser.add_argument("--arms", default=",".join(ARMS[1:]), help="trained arms to run (init is always evaluated)")
    parser.add_argument("--data", type=Path, default=None, help="offline web (default: make data's)")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--vocabulary", choices=("wordnet", "corpus"), default="wordnet", help="wordnet: the paper's 146,347 noun concepts; corpus: the offline web's concept names (smoke runs)")
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE", help="override a profile field (e.g. steps_per_round=100)")
    args = parser.parse_args(argv)
    profile = PROFILES[args.profile]
    for item in args.set:
        name, _, value = item.partition("=")
        kind = type(getattr(profile, name))
        profile = dataclasses.replace(profile, **{name: kind(value)})
    branches = args.branch or ["animals", "food", "plants"]
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    arms = [a for a in args.arms.split(",") if a]
    unknown = set(arms) - set(TRAINED)
    if unknown:
        parser.error(f"--arms: unknown {sorted(unknown)} (choose from {', '.join(TRAINED)})")
    if "random" in arms and "ie" not in arms:
        parser.error("--arms: random matches ie's image count per round; run ie too")
    arms = [a for a in TRAINED if a in arms]
    if profile.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("profile gpu needs CUDA")
    device = torch.device(profile.device)
    if device.type == "cpu":
        torch.set_num_threads(os.cpu_count() or 1)
    data_dir = args.data or default_data_dir()
    out_path = args.out or RESULTS / ("learning.json" if args.profile == "cpu" else f"learning-{args.profile}.json")
    started = time.perf_counter()
    print(f"bench.learning: profile {profile.name}, {branches}, seeds {seeds}, arms {arms}, on {machine()}", flush=True)
    web = OfflineWeb(data_dir)
    vocabulary, embeddings = vocabulary_pool(args.vocabulary, web)
    ie_pool = planning.vocabulary_pool(vocabulary, embeddings)
    reward_model = planning.RewardModel(device="cuda" if device.type == "cuda" else "cpu")
    pixels = Pixels()
    results = []
    for branch in branches:
        data = TargetData.load(data_dir, branch)
        relevant = web.relevant(data.target)
        print(f"\n== {branch}: {len(data.train_paths)} train ({len(data.labelled_paths)} labelled), {len(data.test_paths)} test, {int(relevant.sum())} relevant web images of {len(relevant):,}", flush=True)
        evaluate = Evaluator(data, pixels, profile.image_size, device)
        pools = {"ie": ie_pool, "labels": label_pool(vocabulary, embeddings, data.class_names, web.embedder)}
        auc_rng = np.random.default_rng(12345)
        positives = np.flatnonzero(relevant)
        negatives = np.flatnonzero(~relevant)
        take_pos = min(len(positives), profile.auc_sample // 3)
        sample = np.concatenate([auc_rng.choice(positives, take_pos, replace=False), auc_rng.choice(negatives, min(len(negatives), profile.auc_sample - take_pos), replace=False)])
        sample_pixels = pixels.batch([web.path(int(r)) for r in sample], profile.image_size)
        bank_pixels = pixels.batch(data.train_paths, profile.image_size)

        def rewards_of(state: EncoderState) -> np.ndarray:
            return explore.knn_rewards(embed_images(state, sample_pixels, device), embed_images(state, bank_pixels, device))

        def auc_of(rewards: np.ndarray) -> float:
            return round(explore.reward_auc(rewards, relevant[sample]), 4)

        initial_state_ = initial_state(profile, device, 0)
        initial = evaluate(initial_state_)
        initial_rewards = rewards_of(initial_state_)
        aucs: dict = {"init": auc_of(initial_rewards)}
        arm_rewards: dict[str, list[np.ndarray]] = {}
        print(f"  init: k-NN {initial.knn_top1:.3f}, probe {initial.probe_top1:.3f}, reward AUC {aucs['init']}", flush=True)
        runs: dict[str, list[ArmRun]] = {a: [] for a in arms}
        for seed in seeds:
            per_round_new = None
            for arm in sorted(arms, key=("target", "ie", "random", "labels").index):  # random matches ie's counts
                run = run_arm(arm, seed, profile, data, web, relevant, pixels, evaluate, pools, reward_model, device, per_round_new)
                if arm == "ie":
                    per_round_new = [r["new_images"] for r in run.rounds]
                arm_rewards.setdefault(arm, []).append(rewards_of(run.state))
                aucs.setdefault(arm, []).append(auc_of(arm_rewards[arm][-1]))
                run.state = None
                runs[arm].append(run)
        aucs["minus_init"] = {arm: interval_json(explore.auc_difference(initial_rewards, found, relevant[sample])) for arm, found in arm_rewards.items()}
        aucs["sample"] = {"images": int(len(sample)), "relevant": int(relevant[sample].sum())}
        summary = summarise_target(data, runs, initial, aucs, profile)
        print_table(summary)
        results.append(summary)
        # Written after every target: a run cut short keeps what it measured.
        write_report(out_path, profile, seeds, arms, results, started, complete=branch == branches[-1])
    report = json.loads(out_path.read_text())
    met = report["goal"]["targets_meeting"]
    print(f"\ngoal ({report['goal']['statement']}): met on {met or 'none'} of {report['goal']['measurable_targets']} -> {'MET' if report['goal']['met'] else 'NOT MET'}")
    print(f"wrote {out_path} in {report['wall_seconds']:.0f} s")
    return 0


def plot_curves(report: dict, path: Path) -> None:
    """k-NN and linear probe against training steps, per target and arm (mean over seeds), with
    the initial encoder's value as a line: the learning curves the report's verdict rests on."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    targets = report["targets"]
    figure, axes = plt.subplots(2, len(targets), figsize=(4.2 * len(targets), 6.5), squeeze=False)
    for column, target in enumerate(targets):
        for row, metric in enumerate(("knn_top1", "probe_top1")):
            axis = axes[row][column]
            for arm, entry in target["arms"].items():
                curves = np.array([[point[metric] for point in seed["curve"]] for seed in entry["seeds"]])
                steps = [0] + [point["steps"] for point in entry["seeds"][0]["curve"]]
                axis.plot(steps, [target["init"][metric], *curves.mean(axis=0)], marker="o", label=arm)
            axis.axhline(target["init"][metric], color="grey", linestyle=":", linewidth=1)
            name = "k-NN" if metric == "knn_top1" else "linear probe"
            axis.set_title(f"{target['branch']}: {name} ({target['test_images']} test images)", fontsize=9)
            axis.set_xlabel("training steps")
            axis.set_ylabel("top-1 (mean over seeds)")
            if not target["measurable"]:
                axis.text(0.5, 0.5, "not measurable", transform=axis.transAxes, ha="center", color="red")
    axes[0][0].legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=90)
    plt.close(figure)


def write_report(out_path: Path, profile: Profile, seeds: list[int], arms: list[str], results: list[dict], started: float, complete: bool) -> None:
    measurable = [r for r in results if r["measurable"] and isinstance(r["goal"], dict)]
    met = [r["branch"] for r in measurable if r["goal"]["ie_beats_init_knn"] and r["goal"]["ie_at_least_random_knn"]]
    report = {
        "benchmark": "learning",
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine(),
        "profile": dataclasses.asdict(profile),
        "seeds": seeds,
        "arms": ["init", *arms],
        "protocol": "k-NN (bank = labelled train split) and linear probe fitted on train, scored on the test split (eval/), paired bootstrap 95% CI pooled over seeds against init",
        "targets": results,
        "goal": {
            "statement": "(d) ie - (a) init > 0 with the 95% interval above 0, and (d) >= (c) random, on >= 3 measurable targets (k-NN)",
            "targets_meeting": met,
            "measurable_targets": [r["branch"] for r in measurable],
            "met": len(met) >= 3,
        },
        "wall_seconds": round(time.perf_counter() - started, 1),
        "complete": complete,
    }
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(report, indent=1) + "\n")
    plot_curves(report, out_path.with_suffix(".png"))


if __name__ == "__main__":
    sys.exit(main())
