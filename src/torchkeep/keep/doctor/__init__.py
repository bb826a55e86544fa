"""The resume doctor: say in words why a resumed run does not continue the original one."""
