"""Datasets: the procedural shapes world (`sdjax.data.shapes`)."""
from sdjax.data.shapes import (COLOURS, POSITIONS, SHAPES, SIZES, Example, Scene, ShapeAttrs,
                               caption, heldout_examples, heldout_prompts, is_held_out,
                               parse_caption, render, train_examples)
