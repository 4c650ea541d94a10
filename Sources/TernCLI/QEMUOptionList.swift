import QMP

/// One value of QEMU's `key=value,key=value` option syntax, as `-chardev`, `-device`, `-object`
/// and friends take it: an implied first key (`-chardev pty,id=x` names the backend), `,,` for
/// a literal comma; or, where QEMU accepts one (libvirt writes `-device` and `-object` so when the
/// schema allows it), a JSON object.
struct QEMUOptionList {
    /// The implied key's value (the backend, driver or type), when the text starts with one.
    var implied: String?
    var pairs: [(key: String, value: String)]

    /// The last value given for `key`.
    subscript(key: String) -> String? { pairs.last { $0.key == key }?.value }

    /// `impliedKey` is the JSON member that holds what the implied first item names
    /// (`driver` for `-device`, `qom-type` for `-object`).
    init(parsing text: String, option: String, impliedKey: String) throws(CommandLineError) {
        if text.hasPrefix("{") {
            (implied, pairs) = try Self.parse(json: text, option: option, impliedKey: impliedKey)
            return
        }
        var items: [String] = []
        var current = ""
        var characters = Array(text)[...]
        while let character = characters.popFirst() {
            if character == "," {
                if characters.first == "," {
                    characters.removeFirst()
                    current.append(",")
                } else {
                    items.append(current)
                    current = ""
                }
            } else {
                current.append(character)
            }
        }
        items.append(current)
        implied = nil
        pairs = []
        for (position, item) in items.enumerated() {
            if let equals = item.firstIndex(of: "=") {
                let key = String(item[..<equals])
                let value = String(item[item.index(after: equals)...])
                if key == impliedKey { implied = value } else { pairs.append((key, value)) }
            } else if position == 0 {
                implied = item
            } else {
                // QEMU's bare flag: `server` means server=on.
                pairs.append((item, "on"))
            }
        }
        if let implied, implied.isEmpty { self.implied = nil }
    }

    private static func parse(json text: String, option: String, impliedKey: String) throws(CommandLineError)
        -> (String?, [(key: String, value: String)]) {
        let value: JSONValue
        do {
            value = try JSONParser.parse(Array(text.utf8))
        } catch {
            throw CommandLineError("tern run: -\(option) \(text): not valid JSON (\(error.message))")
        }
        guard let object = value.objectValue else {
            throw CommandLineError("tern run: -\(option) \(text): expected a JSON object")
        }
        var implied: String?
        var pairs: [(key: String, value: String)] = []
        for (key, member) in object.members {
            let text: String
            switch member {
            case let .string(string): text = string
            case let .int(number): text = String(number)
            case let .uint(number): text = String(number)
            case let .bool(flag): text = flag ? "on" : "off"
            default:
                throw CommandLineError("tern run: -\(option): member '\(key)' must be a string, number or boolean")
            }
            if key == impliedKey { implied = text } else { pairs.append((key, text)) }
        }
        return (implied, pairs)
    }

    /// Fails naming the first key not in `known`.
    func check(known: Set<String>, option: String, text: String) throws(CommandLineError) {
        if let unknown = pairs.first(where: { !known.contains($0.key) }) {
            throw CommandLineError("tern run: -\(option) \(text): tern does not know '\(unknown.key)' (it knows \(known.sorted().joined(separator: ", ")))")
        }
    }

    /// QEMU's boolean spellings.
    static func isOn(_ value: String?) -> Bool? {
        switch value {
        case "on", "yes", "true": true
        case "off", "no", "false": false
        default: nil
        }
    }
}
