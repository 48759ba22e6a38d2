"""Flower app that trains a skin lesion classifier across hospital sites."""
