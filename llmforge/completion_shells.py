"""Renderers of the static completion scripts: one function per shell, from a CommandSpec tree.

Each script has two parts: tables generated from the tree (subcommands, option names, how many
values an option takes, how a value completes) and fixed driver code that walks the words typed
so far through those tables. Everything is sorted, so the same tree always gives the same text.
"""

from __future__ import annotations

import re
import shlex

from llmforge.completion import GENERATED_NOTE, PROGRAM, ArgumentSpec, CommandSpec, OptionSpec, ValueSpec

# --- bash ---------------------------------------------------------------------------------------

BASH_DRIVER = r"""
# Add the arguments that start with the word being completed ($cur) to COMPREPLY.
_forge_words() {
    local word
    for word in "$@"; do
        if [[ $word == "$cur"* ]]; then
            COMPREPLY+=("$word")
        fi
    done
}

# Add the file and directory names that start with $cur to COMPREPLY.
_forge_files() {
    compopt -o filenames 2>/dev/null
    mapfile -t -O "${#COMPREPLY[@]}" COMPREPLY < <(compgen -f -- "$cur")
}

# Add the directory names that start with $cur to COMPREPLY.
_forge_directories() {
    compopt -o filenames 2>/dev/null
    mapfile -t -O "${#COMPREPLY[@]}" COMPREPLY < <(compgen -d -- "$cur")
}

# Complete the word at COMP_CWORD: walk the earlier words to find the (sub)command, skip the
# values of options, then offer an option value, option names, subcommands or an argument.
# Bash splits "--option=value" into three words, so a lone "=" word is handled as a separator.
_forge() {
    local cur="${COMP_WORDS[COMP_CWORD]}" path=forge word
    local i=1 position=0 options_ended=0
    local _forge_nargs _forge_variadic _forge_subcommands _forge_options _forge_arguments
    COMPREPLY=()

    while (( i < COMP_CWORD )); do
        word="${COMP_WORDS[i]}"
        _forge_command "$path"
        if (( ! options_ended )) && [[ $word == -- ]]; then
            options_ended=1
        elif (( ! options_ended )) && [[ $word == -* ]]; then
            _forge_option_nargs "$path" "$word"
            if (( _forge_nargs > 0 )) && [[ ${COMP_WORDS[i+1]-} == "=" ]]; then
                if (( COMP_CWORD <= i + 2 )); then
                    [[ $cur == "=" ]] && cur=""
                    _forge_value "$path" "$word"
                    return 0
                fi
                (( i += 2 ))
            elif (( _forge_nargs > 0 && COMP_CWORD <= i + _forge_nargs )); then
                _forge_value "$path" "$word"
                return 0
            else
                (( i += _forge_nargs ))
            fi
        elif _forge_is_subcommand "$word"; then
            path="$path $word"
            position=0
            options_ended=0
        else
            (( position += 1 ))
        fi
        (( i += 1 ))
    done

    _forge_command "$path"
    if (( ! options_ended )) && [[ $cur == -* ]]; then
        _forge_words "${_forge_options[@]}"
    elif (( ${#_forge_subcommands[@]} )); then
        _forge_words "${_forge_subcommands[@]}"
    elif (( position < ${#_forge_arguments[@]} )); then
        _forge_value "$path" "${_forge_arguments[position]}"
    elif (( ${#_forge_arguments[@]} && _forge_variadic )); then
        _forge_value "$path" "${_forge_arguments[-1]}"
    fi
    return 0
}

# Succeed when $1 is a subcommand of the command that _forge_command loaded last.
_forge_is_subcommand() {
    local name
    for name in "${_forge_subcommands[@]}"; do
        [[ $name == "$1" ]] && return 0
    done
    return 1
}

complete -F _forge forge
"""


def _bash_quote(text: str) -> str:
    return "'" + text.replace("'", "'\\''") + "'"


def _bash_words(words) -> str:
    return " ".join(shlex.quote(word) for word in words)


def _bash_value_action(value: ValueSpec, models: tuple[str, ...]) -> str:
    if value.kind == "choice":
        return f"_forge_words {_bash_words(value.choices)}"
    if value.kind == "model":
        return f"_forge_words {_bash_words(models)}; _forge_files"
    if value.kind == "file":
        return "_forge_files"
    if value.kind == "directory":
        return "_forge_directories"
    return ""


def _bash_argument_names(command: CommandSpec) -> tuple[list[str], bool]:
    # An argument with nargs=N occupies N positions, and a variadic one repeats for the rest.
    # NOTE: arguments after a variadic argument get no completion.
    names = []
    for argument in command.arguments:
        if argument.nargs < 0:
            return names + [argument.name], True
        names += [argument.name] * argument.nargs
    return names, False


def _bash_command_function(root: CommandSpec) -> list[str]:
    lines = [
        "# Load the subcommands, option names and positional argument names of the command path $1.",
        "_forge_command() {",
        "    _forge_subcommands=() _forge_options=() _forge_arguments=() _forge_variadic=0",
        '    case "$1" in',
    ]
    for command in root.walk():
        lines.append(f"        {_bash_quote(' '.join(command.path))})")
        if command.subcommands:
            lines.append(f"            _forge_subcommands=({_bash_words(sub.path[-1] for sub in command.subcommands)})")
        names = sorted(name for option in command.options for name in option.names)
        if names:
            lines.append(f"            _forge_options=({_bash_words(names)})")
        arguments, variadic = _bash_argument_names(command)
        if arguments:
            lines.append(f"            _forge_arguments=({_bash_words(arguments)})")
        if variadic:
            lines.append("            _forge_variadic=1")
        lines.append("            ;;")
    return lines + ["    esac", "}"]


def _bash_value_functions(root: CommandSpec, models: tuple[str, ...]) -> list[str]:
    nargs_lines = [
        "",
        "# Set _forge_nargs to the number of values that option $2 of command path $1 takes.",
        "_forge_option_nargs() {",
        '    case "$1|$2" in',
    ]
    value_lines = [
        "",
        "# Complete the value of option $2, or of the argument named $2, of command path $1.",
        "_forge_value() {",
        '    case "$1|$2" in',
    ]
    for command in root.walk():
        path = " ".join(command.path)
        for option in command.options:
            if not option.takes_value:
                continue
            pattern = "|".join(_bash_quote(f"{path}|{name}") for name in option.names)
            nargs_lines.append(f"        {pattern}) _forge_nargs={option.nargs} ;;")
            if _bash_value_action(option.value, models):
                value_lines.append(f"        {pattern}) {_bash_value_action(option.value, models)} ;;")
        for argument in command.arguments:
            if _bash_value_action(argument.value, models):
                value_lines.append(f"        {_bash_quote(f'{path}|{argument.name}')}) {_bash_value_action(argument.value, models)} ;;")

    nargs_lines += ["        *) _forge_nargs=0 ;;", "    esac", "}"]
    return nargs_lines + value_lines + ["    esac", "}"]


def render_bash(root: CommandSpec, models: tuple[str, ...]) -> str:
    """Render the bash completion script, which defines _forge and registers it with ``complete``."""
    header = [
        f"# bash completion for {PROGRAM}.",
        f"# {GENERATED_NOTE}",
        "# Install: source this file from ~/.bashrc, or copy it to",
        f"# ~/.local/share/bash-completion/completions/{PROGRAM}.",
        "",
    ]
    lines = header + _bash_command_function(root) + _bash_value_functions(root, models)
    return "\n".join(lines) + "\n" + BASH_DRIVER


# --- zsh ----------------------------------------------------------------------------------------


def _zsh_quote(text: str) -> str:
    return "'" + text.replace("'", "'\\''") + "'"


def _zsh_escape_word(word: str) -> str:
    return re.sub(r"([^A-Za-z0-9_.,+@%/=-])", r"\\\1", word)


def _zsh_description(text: str) -> str:
    return re.sub(r"([\[\]:\\])", r"\\\1", text)


def _zsh_describe_entry(command: CommandSpec) -> str:
    # _describe splits "name:description" at the first unescaped colon.
    return command.path[-1].replace(":", "\\:") + ":" + command.summary


def _zsh_action(value: ValueSpec) -> str:
    if value.kind == "choice":
        return "(" + " ".join(_zsh_escape_word(choice) for choice in value.choices) + ")"
    if value.kind == "model":
        return "_forge_models"
    if value.kind == "file":
        return "_files"
    if value.kind == "directory":
        return "_files -/"
    return " "


def _zsh_option_specs(option: OptionSpec) -> list[str]:
    # Each name gets its own spec. The names exclude each other unless the option may repeat.
    prefix = "*" if option.multiple else ""
    if len(option.names) > 1 and not option.multiple:
        prefix = "(" + " ".join(option.names) + ")"

    specs = []
    for name in option.names:
        separator = ""
        if option.takes_value:
            separator = "=" if name.startswith("--") else "+"
        values = f":{_zsh_description(option.metavar)}:{_zsh_action(option.value)}" * option.nargs
        specs.append(_zsh_quote(f"{prefix}{name}{separator}[{_zsh_description(option.summary)}]{values}"))
    return specs


def _zsh_argument_spec(argument: ArgumentSpec) -> list[str]:
    action = _zsh_action(argument.value)
    if argument.nargs < 0:
        return [_zsh_quote(f"*:{_zsh_description(argument.name)}:{action}")]
    optional = "" if argument.required else ":"
    return [_zsh_quote(f":{optional}{_zsh_description(argument.name)}:{action}")] * argument.nargs


def _zsh_arguments_call(flags: str, specs: list[str]) -> list[str]:
    lines = [f"  _arguments {flags}"] + [f"    {spec}" for spec in specs]
    return [line + " \\" for line in lines[:-1]] + lines[-1:]


def _zsh_function(command: CommandSpec) -> list[str]:
    name = "_" + "__".join(command.path)
    specs = [spec for option in command.options for spec in _zsh_option_specs(option)]
    if not command.subcommands:
        specs += [spec for argument in command.arguments for spec in _zsh_argument_spec(argument)]
        return [f"{name}() {{", *_zsh_arguments_call("-S", specs), "}"]

    # A group completes its options, then a subcommand name. The words after the subcommand go
    # to that subcommand's function, and "*::" shifts $words so that $words[1] is its name.
    lines = [f"{name}() {{", '  local curcontext="$curcontext" state line', "  typeset -A opt_args"]
    lines += _zsh_arguments_call("-C -S", specs + ["': :->subcommand'", "'*:: :->argument'"])
    lines += ["  case $state in", "    (subcommand)", "      local -a subcommands", "      subcommands=("]
    lines += [f"        {_zsh_quote(_zsh_describe_entry(sub))}" for sub in command.subcommands]
    description = _zsh_quote(" ".join(command.path) + " subcommand")
    lines += ["      )", f"      _describe -t commands {description} subcommands", "      ;;"]

    context = "-".join(command.path)
    lines += ["    (argument)", f'      curcontext="${{curcontext%:*:*}}:{context}-$words[1]:"', "      case $words[1] in"]
    lines += [f"        ({_zsh_escape_word(sub.path[-1])}) _{'__'.join(sub.path)} ;;" for sub in command.subcommands]
    return lines + ["      esac", "      ;;", "  esac", "}"]


def render_zsh(root: CommandSpec, models: tuple[str, ...]) -> str:
    """Render the zsh completion script, a ``#compdef`` function file named _forge."""
    lines = [
        f"#compdef {PROGRAM}",
        f"# zsh completion for {PROGRAM}.",
        f"# {GENERATED_NOTE}",
        f"# Install: copy this file as _{PROGRAM} into a directory on $fpath, then run compinit.",
        "",
        "# Complete a model reference: a built-in model name, a file or a directory.",
        "_forge_models() {",
        "  _alternative \\",
        f"    {_zsh_quote('models:built-in model:(' + ' '.join(_zsh_escape_word(m) for m in models) + ')')} \\",
        "    'files:model file or directory:_files'",
        "}",
    ]
    for command in root.walk():
        lines += [""] + _zsh_function(command)
    return "\n".join(lines + ["", '_forge "$@"']) + "\n"


# --- fish ---------------------------------------------------------------------------------------

FISH_DRIVER = r"""
# Print the subcommand path of the command line being completed, e.g. "cache gc".
function __forge_path
    set -l path ''
    set -l skip 0
    for token in (commandline -opc)[2..-1]
        if test $skip -gt 0
            set skip (math $skip - 1)
        else if string match -q -- '-*' $token
            set skip (__forge_option_nargs "$path" $token)
        else if contains -- $token (__forge_subcommands "$path")
            set path (string trim -- "$path $token")
        end
    end
    echo $path
end

# Succeed when the command line being completed is at the subcommand path given as arguments.
function __forge_at
    set -l path (__forge_path)
    test "$path" = "$argv"
end

complete -c forge -f
"""


def _fish_quote(text: str) -> str:
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


def _fish_escape(word: str) -> str:
    return re.sub(r"([^A-Za-z0-9_.,+@%/=:-])", r"\\\1", word)


def _fish_word_list(words) -> str:
    # complete -a and -n expand their argument like a command line, so each word is escaped first.
    return _fish_quote(" ".join(map(_fish_escape, words)))


def _fish_value_flags(value: ValueSpec, models: tuple[str, ...]) -> str:
    # Arguments inherit "complete -c forge -f" (no file names), so -F brings them back.
    if value.kind == "choice":
        return f"-a {_fish_word_list(value.choices)}"
    if value.kind == "model":
        return f"-F -a {_fish_word_list(models)}"
    if value.kind == "file":
        return "-F"
    if value.kind == "directory":
        return "-a '(__fish_complete_directories)'"
    return ""


def _fish_option_line(condition: str, option: OptionSpec, models: tuple[str, ...]) -> str:
    parts = ["complete -c forge", condition]
    for name in option.names:
        if name.startswith("--"):
            parts.append(f"-l {shlex.quote(name[2:])}")
        elif len(name) == 2:
            parts.append(f"-s {shlex.quote(name[1:])}")
        else:
            parts.append(f"-o {shlex.quote(name[1:])}")
    if option.takes_value:
        # -x requires a value and offers no file names unless the value flags add them (-F).
        parts.append("-r" if option.value.kind in ("file", "model") else "-x")
        parts.append(_fish_value_flags(option.value, models))
    if option.summary:
        parts.append(f"-d {_fish_quote(option.summary)}")
    return " ".join(part for part in parts if part)


def _fish_tables(root: CommandSpec) -> list[str]:
    subcommands = ["", "# Print the subcommands of subcommand path $argv[1].", "function __forge_subcommands", "    switch $argv[1]"]
    nargs = ["", "# Print the number of values that option $argv[2] at subcommand path $argv[1] takes.", "function __forge_option_nargs"]
    nargs.append('    switch "$argv[1]|$argv[2]"')
    for command in root.walk():
        path = " ".join(command.path[1:])
        if command.subcommands:
            subcommands += [f"        case {_fish_quote(path)}", f"            printf '%s\\n' {_fish_word_list(sub.path[-1] for sub in command.subcommands)[1:-1]}"]
        for option in command.options:
            if option.takes_value:
                nargs += [f"        case {' '.join(_fish_quote(f'{path}|{name}') for name in option.names)}", f"            echo {option.nargs}"]
    return subcommands + ["    end", "end"] + nargs + ["        case '*'", "            echo 0", "    end", "end"]


def render_fish(root: CommandSpec, models: tuple[str, ...]) -> str:
    """Render the fish completion script: helper functions and one ``complete`` command per candidate set."""
    lines = [
        f"# fish completion for {PROGRAM}.",
        f"# {GENERATED_NOTE}",
        f"# Install: copy this file to ~/.config/fish/completions/{PROGRAM}.fish.",
    ]
    lines += _fish_tables(root) + FISH_DRIVER.rstrip("\n").split("\n")
    for command in root.walk():
        condition = f"-n {_fish_quote(' '.join(['__forge_at', *map(_fish_escape, command.path[1:])]))}"
        lines += ["", f"# {' '.join(command.path)}"]
        for sub in command.subcommands:
            description = f" -d {_fish_quote(sub.summary)}" if sub.summary else ""
            lines.append(f"complete -c forge {condition} -a {_fish_word_list([sub.path[-1]])}{description}")
        lines += [_fish_option_line(condition, option, models) for option in command.options]
        for argument in command.arguments if not command.subcommands else ():
            if argument.value.kind != "none":
                lines.append(f"complete -c forge {condition} {_fish_value_flags(argument.value, models)}")
    return "\n".join(lines) + "\n"
