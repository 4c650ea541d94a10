import Foundation
import TernCLI

exit(Tern.main(arguments: Array(CommandLine.arguments.dropFirst())))
