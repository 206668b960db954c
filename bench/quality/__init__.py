"""The quality family: how close each policy stays to the full cache on our own task families
(answers, teacher-forced fidelity on real text and code), at admission and during decoding."""
