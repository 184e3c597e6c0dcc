"""The jobs behind the command line: finetune, evaluate, merge, analyze, compare. The library never imports them."""
