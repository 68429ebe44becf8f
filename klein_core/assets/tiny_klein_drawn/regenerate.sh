#!/bin/sh
# Rebuilds this folder from the repository root (same bytes with the same torch build).
klein-lora make-tiny --pretrained --out klein_core/assets/tiny_klein_drawn --format both --seed 0 --processes 2
