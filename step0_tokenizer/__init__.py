"""Step 0: the SentencePiece BPE tokenizer, its Hugging Face fast twin (ChatML chat template) and the packed
token files step 1 pretrains on. `python step0_tokenizer/main.py --data_path OUT/data --output_dir OUT/step0`."""
