"""
A trained model out as a Hugging Face GPT-2 folder (config.json + model.safetensors):

    python export.py out/tiny/runs/dpo_0.1 out/dpo_0.1_hf   # a run's policy (out/tiny/sft: pi_ref)
    python -c "from transformers import GPT2LMHeadModel as M; M.from_pretrained('out/dpo_0.1_hf')"

It takes what sample.py takes (a stage folder, a checkpoint .pt, a Hugging Face folder) and writes
hf.save_hf's folder: the weights in Hugging Face's names and layout and the tokenizer's name
under "nanodpo" in config.json (GPT-2's BPE is Hugging Face's "gpt2" tokenizer). A command rather
than a flag of dpo.py: it exports any finished run, or a checkpoint of one still training, without
running anything again. A classifier's scalar head is not written (a language-model folder has no
place for it): its trunk and tied language-model head are.
"""
import sys

from data.corpus import OneLineParser, UsageError
from hf import save_hf
from sample import load


def export(source, out_dir):
    """Write the model at source (what sample.load takes) to out_dir; returns the folder."""
    model, tokenizer, words = load(source)
    folder = save_hf(model, out_dir, tokenizer, words)
    head = "; its scalar head is not written" if model.score_head is not None else ""
    print(f"wrote {folder}: GPT-2 of {model.config.n_layer} layers, {model.config.n_embd} wide, "
          f"{model.config.vocab_size} tokens ({tokenizer} tokenizer){head}")
    return folder


def main(argv=None):
    p = OneLineParser(description="Write a trained model of nanoDPO as a Hugging Face GPT-2 folder")
    p.add_argument("model", help="a stage folder (out/tiny/runs/dpo_0.1, out/tiny/sft), "
                                 "a checkpoint .pt, or a Hugging Face folder")
    p.add_argument("out_dir", help="the folder to write (replaced if it is an earlier export)")
    args = p.parse_args(argv)
    return export(args.model, args.out_dir)


if __name__ == "__main__":
    try:
        main()
    except UsageError as e:
        sys.exit(f"nanoDPO: error: {e}")
