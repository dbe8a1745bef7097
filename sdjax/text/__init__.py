"""Text: the CLIP tokenizer (`tokenizer`), the WebUI prompt syntax (`prompts`) and text
conditioning (`conditioning`)."""
