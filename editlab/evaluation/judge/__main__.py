from editlab.evaluation.judge.cli import cli

cli()
