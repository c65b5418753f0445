"""Media inputs (audio, images, video) turned into what the towers read."""
