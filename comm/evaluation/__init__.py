"""Model-free evaluation: benchmark readers (RefCOCO, POPE, captions) and their official metrics."""
