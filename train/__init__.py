"""What main.py is made of: the command line and the training recipe around the library.

flags.py     the one-line-error parser, argparse types, DeiT's flags
methods/     the pruning methods, one module a family, and the registry that derives the rest
check_args.py  the one check of a command line, before anything is read or written
recipe.py    datasets, loaders, model and its starting weights, optimizer, scheduler, loss, device
checkpoints.py  a checkpoint file read, or one line on why it cannot be
run_dir.py   the run folder: refusal, overwrite, resume checks, log cut-back, TensorBoard
trainer.py   the epoch loop, the cut, the one-shot path

Only this package and main.py read `args`; pruning/, models/ and engine.py never import it.
"""
