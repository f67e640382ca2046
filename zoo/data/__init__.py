"""Data modules, one module per dataset family; offline demo builders live in zoo.data.demo."""
