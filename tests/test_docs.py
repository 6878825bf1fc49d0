"""The documentation cannot rot: every printed command of ours parses with the real argument parsers and config
loader, every relative link resolves, and the README stays a front page."""
import glob
import os

import pytest

from doc_check import check_commands, check_links, heading_anchors, shell_commands
from helpers import REPO

DOCS = [os.path.join(REPO, "README.md")] + sorted(glob.glob(os.path.join(REPO, "docs", "*.md")))
README_LIMIT = 16 * 1024


def _ids(paths: list[str]) -> list[str]:
    return [os.path.relpath(p, REPO) for p in paths]


def test_readme_is_a_front_page():
    readme = os.path.join(REPO, "README.md")
    assert os.path.getsize(readme) <= README_LIMIT
    with open(readme) as f:
        text = f.read()
    assert "quickstart" in heading_anchors(text)
    commands = [c.text for c in shell_commands(readme, text)]
    assert commands[:2] == ["make demo", "make test"], commands


def test_docs_pages_exist():
    assert len(DOCS) > 1, "docs/*.md holds the topics the README links to"


@pytest.mark.parametrize("path", DOCS, ids=_ids(DOCS))
def test_documented_commands_parse(path):
    problems = check_commands(path)
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("path", DOCS, ids=_ids(DOCS))
def test_links_resolve(path):
    problems = check_links(path)
    assert not problems, "\n".join(problems)


def _page(body: str) -> str:
    return f"# A page\n\nSome prose.\n\n```bash\n{body}\n```\n"


FAKE = os.path.join(REPO, "docs", "fake.md")


@pytest.mark.parametrize("body, expected", [
    ("deepspeed lcr_fast/train.py -c configs/demo.yaml --data_dir d --log_dir l --ckpt_dir c --no-such-flag",
     "unrecognized arguments: --no-such-flag"),
    ("python lcr_fast/train.py -c configs/demo.yaml --data_dir d --log_dir l --ckpt_dir c train.bach_size=4",
     "unknown config key 'train.bach_size'"),
    ("lcr-train -c configs/not_there.yaml --data_dir d --log_dir l --ckpt_dir c", "not_there"),
    ("lcr-eval --ckpt x.pt --data_dir d --protocols all", "lcr_fast.eval.cli: unrecognized arguments: --protocols"),
    ("lcr-eval --data_dir d", "required: --ckpt"),
    ("python -m lcr_fast.eval --ckpt x.pt --data_dir d --protocol every", "invalid choice: 'every'"),
    ("python -m lcr_fast.visualize --ckpt x.pt --data_dir d --out h.png --rows 8", "unrecognized arguments: --rows"),
    ("python benchmarks/step_bench.py --steps 4 --warm 2", "unrecognized arguments: --warm"),
    ("python benchmarks/no_such_bench.py", "no such file 'benchmarks/no_such_bench.py'"),
    ("deepspeed --num_gpuz 8 lcr_fast/train.py -c demo ...", "deepspeed: unrecognized arguments: --num_gpuz"),
    ("torchrun --nproc_per_node 2 lcr_fast/train.py -c demo ... model.rationale_wieght=0.1",
     "unknown config key 'model.rationale_wieght'"),
    ("sbatch examples/slurm/nodes_srun.sbatch train.batchsize=256", "unknown config key 'train.batchsize'"),
    ("make demonstrate", "no make target 'demonstrate'"),
    ("lcr-prepare cub200 src dst --lnk copy", "unrecognized arguments: --lnk"),
    ("lcr-doctor --jsn", "unrecognized arguments: --jsn"),
    ("python -m lcr_fast.data.synthetic --out d --demo --colours 3", "unrecognized arguments: --colours"),
    ("python -m lcr_fast.trainer -c demo", "no module 'lcr_fast.trainer'"),
    ("bash benchmarks/gpu_checks.sh --dry-run", "no such file 'benchmarks/gpu_checks.sh'"),
])
def test_checker_names_the_bad_flag_file_and_line(body, expected):
    problems = check_commands(FAKE, _page(body))
    assert len(problems) == 1, problems
    assert problems[0].startswith("docs/fake.md:6: `"), problems[0]
    assert expected in problems[0], problems[0]


@pytest.mark.parametrize("body", [
    "deepspeed --num_gpus 8 lcr_fast/train.py -c byol_cub200 --data_dir ./CUB200 --log_dir l --ckpt_dir c \\\n"
    "    train.batch_size=256 model.pretrained=<resnet50.pth>",
    "srun --ntasks-per-node 8 python -u lcr_fast/train.py -c configs/byol_cub200.yaml ...  # inside an allocation",
    "deepspeed --module lcr_fast.train -c moco_cub200 --data_dir $DATA --log_dir l --ckpt_dir c --resume "
    "train.stop_at_epoch=50",
    "lcr-eval --ckpt x.pth --method byol --config configs/byol_cub200.yaml --data_dir d --protocol linear",
    "python benchmarks/data_bench.py --batch_size 128 --steps 8 --repeats 2 && python benchmarks/peak.py",
    "PATH=.venv/bin:$PATH make demo",
    "pip install -e . && python -m pytest -q tests/test_docs.py",
    "lcr-prepare --help",
    "python lcr_fast/train.py --list-configs",
])
def test_checker_accepts_real_commands(body):
    assert check_commands(FAKE, _page(body)) == []


def test_checker_reads_only_commands():
    text = ("```\nJPEG folders ─► DALI ─► \"BYOL\n```\n\n```python\nload_config('x', ['a.b=1'])\n```\n\n"
            "```bash\ncat > hostfile <<'HOSTS'\nlcr-eval --bogus\nHOSTS\n# lcr-eval --bogus\n```\n\n"
            "```console\n$ lcr-doctor --json\nlcr-eval --bogus (output, not a command)\n```\n")
    assert [c.text for c in shell_commands(FAKE, text)] == ["cat > hostfile <<'HOSTS'", "lcr-doctor --json"]
    assert check_commands(FAKE, text) == []


def test_checker_reads_inline_commands_that_run_ours():
    text = ("Measured with `python benchmarks/retrieval_bench.py --repets 5`; `deepspeed --num_gpus` is a flag.\n"
            "\nA span may wrap: `lcr-eval --ckpt x.pt\n--data_dir d --knn-k 20`.\n")
    problems = check_commands(FAKE, text)
    assert len(problems) == 2, problems
    assert "docs/fake.md:1:" in problems[0] and "--repets" in problems[0], problems
    assert "docs/fake.md:3: `lcr-eval --ckpt x.pt --data_dir d --knn-k 20`" in problems[1], problems


def test_link_checker_finds_missing_files_and_anchors():
    text = ("# Top\n\n## Two words\n\n[ok](#two-words) [ok](../README.md#quickstart) ![ok](speedups.png)\n"
            "[bad](missing.md) and [bad anchor](#three-words) and ![bad](nothing.png) `[not a link](x.md)`\n"
            "[web](https://example.org/x)\n\n```\n[in a block](x.md)\n```\n\nA link may [wrap\nits text](gone.md).\n")
    problems = check_links(FAKE, text)
    assert len(problems) == 4, problems
    assert all(p.startswith("docs/fake.md:6: link") for p in problems[:3]), problems
    assert "missing.md" in problems[0] and "#three-words" in problems[1] and "nothing.png" in problems[2]
    assert problems[3].startswith("docs/fake.md:13: link 'gone.md'"), problems[3]


def test_heading_anchors_follow_github():
    text = "# lcr-fast\n## Cluster jobs: srun, mpirun and `deepspeed`\n## Tests\n## Tests\n```\n# not a heading\n```\n"
    assert heading_anchors(text) == {"lcr-fast", "cluster-jobs-srun-mpirun-and-deepspeed", "tests", "tests-1"}
