"""`matvlm app`: a local web page that puts a teacher and its hybrids side by side on one image.

`engine` loads the models and streams their answers (no web code), `samples` gives the embedded world's
sample scenes, `page` is the Gradio page, `run` checks the command's input and serves the page.
Gradio is an optional extra (`pip install "matvlm[app]"`); only `page` imports it."""
