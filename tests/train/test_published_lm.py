"""The published DEQ-Transformer, built by the command line from WikiText-103 files: the full
model of locuslab's ``wt103_deq_transformer_reg.sh`` (width 700, FFN 48,000, adaptive softmax
over 267,735 words) with Transformer-XL's relative positions and a memory of 300 tokens. The
files are generated: 267,733 made-up words and ``<unk>`` (with ``<eos>``, the vocabulary of
WikiText-103's size); two training steps on 2 rows of 8 words check that the memory is carried."""
import torch

from deqlite.train import __main__ as cli

WT103_VOCAB = 267_735


def write_wikitext103(root):
    folder = root / "wikitext-103"
    folder.mkdir(parents=True)
    words = ["<unk>"] + [f"w{i}" for i in range(WT103_VOCAB - 2)]        # + <eos>: 267,735
    lines = [" ".join(words[i:i + 1000]) for i in range(0, len(words), 1000)]
    (folder / "wiki.train.tokens").write_text("\n".join(lines) + "\n", encoding="utf-8")
    for split in ("valid", "test"):
        (folder / f"wiki.{split}.tokens").write_text(" w1 w2 w3 <unk> w4 w5 w6 w7 \n" * 4,
                                                     encoding="utf-8")
    return root


def test_the_cli_builds_the_published_model_with_memory_and_relative_positions(tmp_path, capsys):
    root = write_wikitext103(tmp_path / "data")
    log, checkpoint = tmp_path / "run.jsonl", tmp_path / "run.pt"
    trainer = cli.main(["--config", "wt103_deq_transformer_jr", "--set", f"data_root={root}",
                        "--dry-run", "--log", str(log), "--checkpoint", str(checkpoint)])
    out = capsys.readouterr().out
    assert ("deq_transformer_lm on wikitext103: 96,448,350 parameters; DEQ: anderson forward "
            "(≤ 12), ift backward; relative positions; memory of 300 tokens (300 in "
            "evaluation)") in out
    assert "steps of 56 would be trained" in out and not log.exists() and not checkpoint.exists()
    model = trainer.model
    assert trainer.train_set.vocab_size == WT103_VOCAB and model.cell.weight_norm
    assert model.cell.dropatt == 0.01 and model.cell.norm_kind == "post"
    # two segments of 8 words in 2 rows: the second attends to the first through the memory
    torch.set_num_threads(1)
    x = trainer.train_set.tokens[:34].view(2, 17)
    model.eval()
    with torch.no_grad(), model.deq.options(pretrain_steps=2):   # as in the warm-up: unrolled
        model.loss(x[:, :8], x[:, 1:9])
        first = model.next_memory
        model.loss(x[:, 8:16], x[:, 9:17], memory=first)
    memory = model.next_memory
    assert first.z.shape == (2, 8, 700) and memory.z.shape == (2, 16, 700)
    assert memory.u.shape == (2, 16, 2100) and torch.equal(memory.z[:, :8], first.z)
