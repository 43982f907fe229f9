"""`python -m stack` (what `make run` runs): the adapter store, one worker and the router as local processes,
on an embedded default (a small random Llama-family model and demo adapters built once into .demo/), or on
a real model directory; see stack/README.md."""
