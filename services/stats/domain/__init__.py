"""Pure rules of the stats read model: age arithmetic, scopes and the events it reads."""
