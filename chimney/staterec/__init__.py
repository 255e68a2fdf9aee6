"""What device and guest share about offloaded objects beyond chimney.hw:
the byte encoding of state trees and state records (`codec`)."""
