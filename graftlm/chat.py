"""`graftlm chat DIR`: the seed's interactive loop over a Scaffolded GPT-2.

Each input line is a command or a prompt: "train" trains on the data file given with --train-data,
"quit" or "exit" leaves (so does the end of input), anything else is answered. Works the same when another
program drives it through a pipe: no prompt marker is printed unless stdin is a terminal.
"""

import sys

from .inputs import NON_NEGATIVE_INT, POSITIVE, POSITIVE_INT, UNIT_INTERVAL

QUIT = ("quit", "exit")


def add_arguments(parser):
    parser.add_argument("model", help="Scaffolded GPT-2 folder")
    parser.add_argument("--train-data", help="prompt/completion file (or datasets name) that the 'train' command uses")
    parser.add_argument("--valid-data", help="validation pairs for 'train' (default: hold out 20%% of --train-data)")
    parser.add_argument("--epochs", type=POSITIVE_INT, default=3, help="epochs per 'train' command")
    parser.add_argument("--batch-size", type=POSITIVE_INT, default=1)
    parser.add_argument("--checkpoint-dir", help="where 'train' writes its per-epoch checkpoints (default: none)")
    parser.add_argument("--max-new-tokens", type=POSITIVE_INT, default=60)
    parser.add_argument("--scaffold-weight", type=UNIT_INTERVAL, default=1.0, help="scaffold influence in [0, 1]")
    parser.add_argument("--truncate-repeats", type=NON_NEGATIVE_INT, default=3,
                        help="cut an answer before its first repeated n-gram (0: never)")
    parser.add_argument("--do-sample", action="store_true", help="sample instead of greedy decoding")
    parser.add_argument("--temperature", type=POSITIVE, default=1.0)
    parser.add_argument("--top-k", type=POSITIVE_INT, default=50)
    parser.add_argument("--seed", type=int, default=0)
    parser.set_defaults(func=main)


def chat(model, tokenizer, lines, write, *, train_pairs=None, valid_pairs=None, train_options=None,
         generate_kwargs=None, interactive=False):
    """Run the loop over `lines` (an iterator of input lines), writing with `write(text)`. Returns on quit/exit/EOF."""
    from .training.scaffold import generate_answers, split_pairs, train

    generate_kwargs = dict(generate_kwargs or {})
    if interactive:
        write("Scaffolded GPT-2 chat: type a prompt, 'train' to train, 'quit' or 'exit' to leave.\n> ")
    for line in lines:
        text = line.strip()
        if text.lower() in QUIT:
            break
        if text.lower() == "train":
            if train_pairs is None:
                write("no training data configured: start the chat with --train-data FILE\n")
            else:
                train_part, valid_part = (train_pairs, valid_pairs) if valid_pairs else split_pairs(
                    train_pairs, train_options.valid_split, train_options.seed)
                result = train(model, tokenizer, train_part, valid_part, train_options)
                write(f"trained {result.epochs_run} epoch(s): validation loss {result.initial_valid_loss:.4f} -> "
                      f"{result.best_valid_loss:.4f}\n")
        elif text:
            write(generate_answers(model, tokenizer, [text], **generate_kwargs)[0].strip() + "\n")
        if interactive:
            write("> ")


def main(args):
    import torch

    from .training.scaffold import ScaffoldSession, TrainingOptions, load_pairs

    train_options = TrainingOptions(epochs=args.epochs, batch_size=args.batch_size, checkpoint_dir=args.checkpoint_dir,
                                    samples_per_epoch=0)
    # Data files are read (and checked) before the model is loaded, so a bad file fails at once.
    train_pairs = load_pairs(args.train_data) if args.train_data else None
    valid_pairs = load_pairs(args.valid_data) if args.valid_data else None
    session = ScaffoldSession.from_pretrained(args.model)
    generate_kwargs = {
        "max_new_tokens": args.max_new_tokens,
        "scaffold_weight": args.scaffold_weight,
        "truncate_repeats": args.truncate_repeats or None,
        "do_sample": args.do_sample,
    }
    if args.do_sample:
        generate_kwargs.update(temperature=args.temperature, top_k=args.top_k)
    torch.manual_seed(args.seed)

    def write(text):
        sys.stdout.write(text)
        sys.stdout.flush()

    chat(session.model, session.tokenizer, sys.stdin, write, train_pairs=train_pairs, valid_pairs=valid_pairs,
         train_options=train_options, generate_kwargs=generate_kwargs, interactive=sys.stdin.isatty())

